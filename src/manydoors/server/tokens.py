"""Client tokens (auth mode "token"): a JWT in ``hello`` says who the client is.

``sub`` is the user id; the optional ``channels`` claim lists the channels the user
may use beyond what the namespaces allow everyone: private ones (names starting with
``$``: subscribe and publish) and those of namespaces with ``subscribe = "token"``; ``exp`` (and
``nbf``) are honoured when present. Verification is PyJWT's: HMAC with the
configured secret, or RS256 / ES256 with the configured public key.

PyJWT (and cryptography under it: megabytes) is imported only when a Verifier is
made, so workers of a server without tokens do not carry it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

    Key = RSAPublicKey | EllipticCurvePublicKey | str

from ..config import AuthConfig

HMAC: tuple[str, ...] = ("HS256", "HS384", "HS512")
PUBLIC: tuple[str, ...] = ("RS256", "ES256")


class TokenError(Exception):
    """Why a token was refused, for the client's ``unauthorized`` error."""


class KeyFileError(Exception):
    """The public key file cannot be read or is not an RSA/EC public key."""


@dataclass(frozen=True, slots=True)
class Grant:
    user: str
    channels: frozenset[str]  # the channels the token grants ($ ones, subscribe = token)
    expires: float | None = None  # the token's exp (unix seconds), if it has one


class Verifier:
    __slots__ = ("algorithms", "jwt", "key")

    def __init__(self, auth: AuthConfig) -> None:
        import jwt

        self.jwt = jwt
        self.key: Key
        if auth.public_key is not None:
            self.key = load_public_key(auth.public_key)
            self.algorithms = PUBLIC
        else:
            self.key = auth.secret or ""
            self.algorithms = HMAC

    def verify(self, token: str) -> Grant:
        jwt = self.jwt
        try:
            claims = jwt.decode(
                token, self.key, algorithms=list(self.algorithms), options={"require": ["sub"]}
            )
        except jwt.ExpiredSignatureError:
            raise TokenError("token expired") from None
        except jwt.InvalidTokenError as exc:
            raise TokenError(f"invalid token: {exc}") from None
        user = claims["sub"]
        if not isinstance(user, str) or not 0 < len(user) <= 128 or not user.isprintable():
            raise TokenError("invalid token: sub must be a printable string of 1-128 chars")
        channels = claims.get("channels", [])
        if not isinstance(channels, list) or not all(isinstance(c, str) for c in channels):
            raise TokenError("invalid token: channels must be a list of strings")
        # Private ($) channels, and those of namespaces with subscribe = "token".
        exp = claims.get("exp")  # PyJWT has checked it is a number in the future
        return Grant(user, frozenset(channels), float(exp) if exp is not None else None)


def load_public_key(path: str) -> RSAPublicKey | EllipticCurvePublicKey:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        with open(path, "rb") as f:
            key = load_pem_public_key(f.read())
    except OSError as exc:
        raise KeyFileError(f"auth.public_key {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise KeyFileError(f"auth.public_key {path}: not a PEM public key ({exc})") from None
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise KeyFileError(f"auth.public_key {path}: an RSA or EC key is needed (RS256, ES256)")
    return key
