"""MQTT broker settings (ARCHITECTURE.md §7): where alerts are published and how the connection is secured.

Secrets never sit in the YAML: the password comes from a file or an environment variable and is
held as a `SecretStr`, so it does not show up in `repr()`, logs or `check-config` output.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from enclave_bridge.shared.errors import ConfigError

_TOPIC_PREFIX_RE = re.compile(r"^[^#+\s/][^#+\s]*[^#+\s/]$|^[^#+\s/]$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TLSConfig(_Model):
    """TLS to the broker. `ca_file` alone = server authentication; add `cert_file`/`key_file` for
    client-certificate authentication (Mosquitto `require_certificate true`)."""

    ca_file: Path | None = Field(
        default=None, description="CA bundle that signed the broker certificate; null = system CAs"
    )
    cert_file: Path | None = Field(default=None, description="client certificate (PEM) for mutual TLS")
    key_file: Path | None = Field(default=None, description="client private key (PEM) for mutual TLS")
    insecure: bool = Field(
        default=False,
        description="skip broker hostname verification (testing only; the chain is still checked)",
    )

    @model_validator(mode="after")
    def _pair(self) -> TLSConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (mutual TLS needs both)")
        return self


class BrokerConfig(_Model):
    """One MQTT broker connection shared by every camera of the daemon (topics carry the device id)."""

    host: str = Field(default="127.0.0.1", min_length=1, description="broker host name or address")
    port: int = Field(default=1883, ge=1, le=65535, description="broker TCP port (8883 is usual with TLS)")
    client_id: str | None = Field(
        default=None, max_length=128, description="MQTT client id; null = 'veilcam-<first device>'"
    )
    username: str | None = Field(default=None, description="MQTT user name (password from password_file/env)")
    password_file: Path | None = Field(default=None, description="file holding the MQTT password")
    password_env: str | None = Field(
        default=None, description="environment variable holding the MQTT password"
    )
    tls: TLSConfig | None = Field(default=None, description="TLS settings; null = plain TCP")
    keepalive_s: int = Field(
        default=30, ge=5, le=65535, description="MQTT keepalive; the broker sends the LWT after 1.5x this"
    )
    reconnect_min_delay_s: float = Field(default=0.5, gt=0, description="first wait before reconnecting")
    reconnect_max_delay_s: float = Field(default=30.0, gt=0, description="ceiling of the reconnect backoff")
    topic_prefix: str = Field(
        default="veilcam", description="topics are <prefix>/<device>/{alerts,available,...}"
    )
    qos: Literal[1, 2] = Field(
        default=1, description="QoS of alerts and availability (stats are always QoS 0)"
    )
    protocol: Literal["auto", "5", "3.1.1"] = Field(
        default="auto", description="MQTT version; auto = 5, falling back to 3.1.1 if the broker refuses it"
    )
    max_inflight: int = Field(
        default=20, ge=1, le=65535, description="unacknowledged QoS 1 publishes in flight"
    )
    connect_timeout_s: float = Field(default=10.0, gt=0, description="TCP/TLS connect timeout per attempt")
    flush_timeout_s: float = Field(
        default=10.0,
        ge=0,
        description="on shutdown: time to get pending alerts acknowledged (rest stays queued)",
    )

    @field_validator("topic_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not _TOPIC_PREFIX_RE.match(v):
            raise ValueError("topic_prefix: no wildcards (+, #), spaces or leading/trailing '/'")
        return v

    @model_validator(mode="after")
    def _checks(self) -> BrokerConfig:
        if self.password_file is not None and self.password_env is not None:
            raise ValueError("set password_file or password_env, not both")
        if (self.password_file is not None or self.password_env is not None) and self.username is None:
            raise ValueError("a password needs a username")
        if self.reconnect_max_delay_s < self.reconnect_min_delay_s:
            raise ValueError("reconnect_max_delay_s must be >= reconnect_min_delay_s")
        return self

    def password(self) -> SecretStr | None:
        """The MQTT password from its file or environment variable (never from the YAML)."""
        if self.password_file is not None:
            try:
                return SecretStr(self.password_file.read_text().strip())
            except OSError as e:
                raise ConfigError(
                    f"broker.password_file: cannot read {self.password_file}: {e.strerror}"
                ) from e
        if self.password_env is not None:
            value = os.environ.get(self.password_env)
            if value is None:
                raise ConfigError(f"broker.password_env: environment variable {self.password_env} is not set")
            return SecretStr(value)
        return None

    def topic(self, device: str, kind: str) -> str:
        """`<prefix>/<device>/<kind>` for kind in alerts | available | enclave | stats."""
        return f"{self.topic_prefix}/{device}/{kind}"

    @classmethod
    def from_address(cls, address: str, **kw: object) -> BrokerConfig:
        """Parse `HOST:PORT`, `mqtt://HOST:PORT` or `HOST` (port 1883) — the CLI's `--broker`."""
        addr = address.removeprefix("mqtt://")
        host, sep, port = addr.rpartition(":")
        if not sep:
            host, port = addr, "1883"
        if not host or not port.isdigit():
            raise ConfigError(f"--broker {address!r}: expected HOST:PORT")
        try:
            return cls(host=host.strip("[]"), port=int(port), **kw)
        except ValueError as e:
            raise ConfigError(f"--broker {address!r}: {e}") from e


__all__ = ["BrokerConfig", "TLSConfig"]
