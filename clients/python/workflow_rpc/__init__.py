"""How our services and clients speak gRPC (docs/architecture.md#speaking-grpc): the call
metadata (tenant, Session headers), error statuses with their details, and, for the two
services, server start-up, JSON logs and the malformed-request interceptor. Neither service
imports the other; both import this."""
