"""Checking a call's credentials (docs/security.md): bearer tokens from a token file of hashed
tokens, and JWTs signed with an HS256 secret or a key of a JWKS file. Both files are read again
when they change, without a restart; a file that no longer parses leaves the last good one in
force (and says so in the log)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import jwt
from pydantic import BaseModel, ConfigDict, Field, field_validator

from workflow_rpc.callers import ANY_TENANT, Identity, Role
from workflow_rpc.config_files import parse_yaml_file
from workflow_rpc.headers import AUTHORIZATION_HEADER, TENANT_HEADER
from workflow_rpc.reloading import ReloadedFiles
from workflow_rpc.settings import ServiceSettings
from workflow_rpc.tenants import TENANT_PATTERN

__all__ = [
    "Authenticator",
    "CredentialsRefused",
    "JwtKeys",
    "PermissionDenied",
    "TokenFile",
    "Unauthenticated",
    "authenticator_of",
    "token_hash",
]

# How often a credentials file is looked at for a change, at most (a stat per call is waste).
RELOAD_CHECK_SECONDS = 1.0
# Seconds of clock skew a JWT's exp and nbf are given.
JWT_LEEWAY_SECONDS = 30


class CredentialsRefused(Exception):
    """A call whose credentials do not admit it."""


class Unauthenticated(CredentialsRefused):
    """No credential, or one that is not valid (UNAUTHENTICATED)."""


class PermissionDenied(CredentialsRefused):
    """A valid credential that may not make this call (PERMISSION_DENIED)."""


def token_hash(token: str) -> str:
    """What a token file holds of a token: its SHA-256, in hex (`printf %s TOKEN | sha256sum`)."""
    return hashlib.sha256(token.encode()).hexdigest()


def _tenant(value: str) -> str:
    if value != ANY_TENANT and not TENANT_PATTERN.match(value):
        raise ValueError(f"{value!r} is not a tenant name (or {ANY_TENANT!r})")
    return value


class _IdentityEntry(BaseModel):
    """Who an entry of a token file is."""

    model_config = ConfigDict(extra="forbid")

    subject: str = Field(min_length=1, max_length=200)
    """Who holds it."""
    tenant: str
    """The tenant it acts for, or "*"."""
    roles: list[Role] = Field(min_length=1)
    """What it may do."""

    @field_validator("tenant")
    @classmethod
    def _a_tenant(cls, value: str) -> str:
        return _tenant(value)

    def identity(self) -> Identity:
        return Identity(subject=self.subject, tenant=self.tenant, roles=frozenset(self.roles))


class _TokenEntry(_IdentityEntry):
    """One token of a token file."""

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    """The token's SHA-256 in lowercase hex: the file never holds a token itself."""


class _CertificateEntry(_IdentityEntry):
    """A client certificate's name, as an identity (mTLS: docs/security.md#tls-and-mtls)."""

    san: str = Field(min_length=1, max_length=2000)
    """A subject alternative name of the certificate (a DNS name, or a URI such as
    spiffe://cluster/ns/jobs/sa/engine)."""


class _TokenFileModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tokens: list[_TokenEntry] = Field(default_factory=list)
    certificates: list[_CertificateEntry] = Field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _Credentials:
    tokens: dict[str, Identity]
    """By the token's hash."""
    certificates: dict[str, Identity]
    """By a certificate's subject alternative name."""


def _parse_token_file(files: list[bytes]) -> _Credentials:
    (raw,) = files
    model = parse_yaml_file(raw, _TokenFileModel, "token file")  # `tokens: []` holds none
    return _Credentials(
        tokens={entry.sha256: entry.identity() for entry in model.tokens},
        certificates={entry.san: entry.identity() for entry in model.certificates},
    )


class TokenFile:
    """Bearer tokens by their hash, and client certificates by name
    (docs/security.md#token-files)."""

    def __init__(self, path: Path) -> None:
        self._file = ReloadedFiles(
            [path], _parse_token_file, "credentials file", RELOAD_CHECK_SECONDS
        )

    def identity(self, token: str) -> Identity | None:
        return self._file.current().tokens.get(token_hash(token))

    def certificate_identity(self, names: Sequence[str]) -> Identity | None:
        """The identity of the first of a client certificate's names the file maps."""
        mapped = self._file.current().certificates
        return next((mapped[n] for n in names if n in mapped), None)


def _claims_identity(claims: dict[str, object]) -> Identity:
    tenant, roles = claims.get("tenant"), claims.get("roles")
    if not isinstance(tenant, str):
        raise Unauthenticated("the token's claims name no tenant")
    if isinstance(roles, str):
        roles = roles.split()
    if not isinstance(roles, list) or not roles:
        raise Unauthenticated("the token's claims name no roles")
    try:
        return Identity(
            subject=str(claims["sub"]),
            tenant=_tenant(tenant),
            roles=frozenset(Role(str(r)) for r in roles),
        )
    except ValueError as exc:
        raise Unauthenticated(f"the token's claims do not parse: {exc}") from None


# The algorithms of JWKS keys: public keys only (an `oct` key there would be a shared secret).
_ASYMMETRIC = ("RS", "PS", "ES", "EdDSA")
# The least an HS256 secret may be: the hash's own size.
SECRET_MIN_BYTES = 32


def _parse_jwks(files: list[bytes]) -> jwt.PyJWKSet:
    (raw,) = files
    try:
        keys = jwt.PyJWKSet.from_json(raw.decode())
    except (
        jwt.PyJWKError,
        jwt.PyJWKSetError,
        UnicodeDecodeError,
        json.JSONDecodeError,
        AttributeError,  # JSON, but not an object
        TypeError,
    ) as exc:
        raise ValueError(f"not a JWKS file: {exc}") from None
    if not any(key.algorithm_name.startswith(_ASYMMETRIC) for key in keys.keys):
        raise ValueError("the JWKS file holds no RSA, EC or OKP public key")
    return keys


def _parse_secret(files: list[bytes]) -> bytes:
    secret = files[0].strip()
    if len(secret) < SECRET_MIN_BYTES:
        raise ValueError(f"the JWT secret must be at least {SECRET_MIN_BYTES} bytes")
    return secret


class JwtKeys:
    """JWTs with the claims `sub`, `tenant`, `roles`, `exp` and `aud` (docs/security.md#jwts),
    signed with the secret of `secret_file` (HS256) or a key of `jwks_file`."""

    def __init__(
        self, *, audience: str, secret_file: Path | None = None, jwks_file: Path | None = None
    ) -> None:
        if secret_file is None and jwks_file is None:
            raise ValueError("JwtKeys needs a secret file or a JWKS file")
        self.audience = audience
        every = RELOAD_CHECK_SECONDS
        self._secret = (
            ReloadedFiles([secret_file], _parse_secret, "JWT secret", every)
            if secret_file
            else None
        )
        self._jwks = (
            ReloadedFiles([jwks_file], _parse_jwks, "JWKS file", every) if jwks_file else None
        )

    def identity(self, token: str) -> Identity:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthenticated("the token is neither a known token nor a JWT") from None
        key, algorithm = self._key_for(header)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self.audience,
                leeway=JWT_LEEWAY_SECONDS,
                options={"require": ["exp", "sub", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("the token has expired") from None
        except jwt.InvalidAudienceError:
            raise Unauthenticated(f"the token is not for this audience ({self.audience})") from None
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"the token is not valid: {exc}") from None
        return _claims_identity(claims)

    def _key_for(self, header: dict[str, object]) -> tuple[object, str]:
        alg = header.get("alg")
        if not isinstance(alg, str) or not (alg == "HS256" or alg.startswith(_ASYMMETRIC)):
            raise Unauthenticated(f"tokens signed with {alg!r} are not accepted here")
        if alg == "HS256" and self._secret is not None:
            return self._secret.current(), "HS256"
        if self._jwks is not None and alg != "HS256":
            kid = header.get("kid")
            for key in self._jwks.current().keys:
                # A JWK without "alg" gets its key type's (RSA: RS256, EC: by curve).
                if (kid is None or key.key_id == kid) and key.algorithm_name == alg:
                    return key.key, alg
            raise Unauthenticated(f"no {alg} key of the JWKS file has kid {kid!r}")
        raise Unauthenticated(f"tokens signed with {alg!r} are not accepted here")


class Authenticator:
    """The identity of a call's bearer token, and whether it may make the call."""

    def __init__(
        self,
        *,
        tokens: TokenFile | None = None,
        jwts: JwtKeys | None = None,
        system_tenant: str | None = None,
    ) -> None:
        self.tokens = tokens
        self.jwts = jwts
        self.system_tenant = system_tenant
        """A tenant only the system role may name (the engine's own records)."""

    def identity(
        self,
        metadata: Sequence[tuple[str, str | bytes]],
        peer_names: Callable[[], Sequence[str]] = tuple,
    ) -> Identity:
        """The call's identity: its bearer token's, or else its client certificate's (a name
        the token file maps; `peer_names` are asked only then)."""
        given = [v for k, v in metadata if k == AUTHORIZATION_HEADER]
        if not given:
            names = peer_names()
            found = self.tokens.certificate_identity(names) if names and self.tokens else None
            if found is not None:
                return found
            unmapped = " (no name of the client certificate is in the token file)"
            raise Unauthenticated(
                f"no credentials: this service needs '{AUTHORIZATION_HEADER}: Bearer TOKEN'"
                + (unmapped if names else "")
            )
        if len(given) > 1:
            raise Unauthenticated(f"{len(given)} {AUTHORIZATION_HEADER} headers; send one")
        value = given[0] if isinstance(given[0], str) else given[0].decode("utf-8", "replace")
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated(f"{AUTHORIZATION_HEADER} must be 'Bearer TOKEN'")
        token = token.strip()
        found = self.tokens.identity(token) if self.tokens is not None else None
        if found is not None:
            return found
        if self.jwts is not None and token.count(".") == 2:
            return self.jwts.identity(token)
        raise Unauthenticated("the token is not known here")

    def admit(
        self,
        method: str,
        needed: Role | None,
        metadata: Sequence[tuple[str, str | bytes]],
        peer_names: Callable[[], Sequence[str]] = tuple,
    ) -> Identity:
        """The caller's identity if it may call `method` (needing `needed`: None, a method no
        role opens) for the tenants its metadata names."""
        identity = self.identity(metadata, peer_names)
        name = method.rsplit("/", 1)[-1]
        if identity.tenant == self.system_tenant and not identity.may(Role.SYSTEM):
            raise PermissionDenied(f"tenant {identity.tenant!r} is the engine's own (system role)")
        if needed is None or not identity.may(needed):
            held = ", ".join(sorted(identity.roles))
            what = f"the {needed} role" if needed is not None else "a role no credential has"
            raise PermissionDenied(f"{name} needs {what}; {identity.subject} has {held}")
        for value in [v for k, v in metadata if k == TENANT_HEADER]:
            tenant = value if isinstance(value, str) else value.decode("utf-8", "replace")
            if not identity.acts_for(tenant):
                raise PermissionDenied(
                    f"{identity.subject} acts for tenant {identity.tenant!r} only, "
                    f"not {tenant[:64]!r}"
                )
            if tenant == self.system_tenant and not identity.may(Role.SYSTEM):
                raise PermissionDenied(f"tenant {tenant!r} is the engine's own (system role)")
        return identity


def authenticator_of(
    settings: ServiceSettings, *, system_tenant: str | None = None
) -> Authenticator | None:
    """The settings' credential checks (None: no --auth-* setting, every call admitted), or
    the process stops with one line naming the file that does not parse."""
    if not settings.auth_configured:
        return None
    prog = settings.model_config.get("cli_prog_name") or "settings"
    if not (settings.auth_token_file or settings.auth_jwt_secret_file or settings.auth_jwks_file):
        raise SystemExit(
            f"{prog}: error: --tls-client-ca-file checks who connects, not what they may do: "
            "add --auth-token-file (its certificates: map a certificate's name to an identity) "
            "or a JWT key"
        )
    try:
        tokens = TokenFile(settings.auth_token_file) if settings.auth_token_file else None
        jwts = (
            JwtKeys(
                audience=settings.auth_jwt_audience,
                secret_file=settings.auth_jwt_secret_file,
                jwks_file=settings.auth_jwks_file,
            )
            if settings.auth_jwt_secret_file or settings.auth_jwks_file
            else None
        )
    except (OSError, ValueError) as exc:
        raise SystemExit(f"{prog}: error: credentials: {exc}") from None
    return Authenticator(tokens=tokens, jwts=jwts, system_tenant=system_tenant)
