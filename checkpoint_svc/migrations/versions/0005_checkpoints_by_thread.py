"""Listing a thread across namespaces (ListRequest.namespace_prefix).

Revision ID: 0005
"""

from checkpoint_svc.migrations.indexes import create_index

revision = "0005"
down_revision = "0004"


def upgrade() -> None:
    create_index("checkpoints_by_thread", "checkpoints", "(tenant, thread_id, checkpoint_id)")
