"""Typed settings: one object per service, from command-line flags, then environment variables, then defaults.

Each service's own knobs read ``<SERVICE>_NAME`` (``SIGLIP2_MODEL``, ``QWEN3_LAYER``); every knob can also be given
for both services at once as ``EMBED_NAME`` (``EMBED_HOST``, ``EMBED_MAX_BATCH_SIZE``); the service prefix wins.
``FORCE_CPU=1`` is read as it is, unprefixed: the name the Quadux SigLIP API uses, which existing deployments set.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import ClassVar, Literal, TypeVar, get_args, get_origin

from pydantic import AliasChoices, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    CliApp,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

Device = Literal["auto", "cuda", "cpu", "mps"]
DType = Literal["auto", "bfloat16", "float16", "float32"]
Modality = Literal["image", "text"]

MB = 1024 * 1024
# Admits a 60-100 MP PNG or TIFF scan; decoding takes 5-20 bytes a pixel, so at most about 2 GB at once.
DEFAULT_MAX_DECODED_PIXELS = 100_000_000


class ServiceSettings(BaseSettings):
    """Settings both services have. Subclasses add ``model``, ``port`` and model-specific options."""

    model_config = SettingsConfigDict(
        env_prefix="EMBED_",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        extra="ignore",
    )
    # Prefix of the service's own environment variables, e.g. "SIGLIP2_".
    service_env_prefix: ClassVar[str] = ""
    # Which inputs the service embeds: decides which routes it mounts and what its model accepts.
    modalities: ClassVar[tuple[Modality, ...]] = ("text",)
    # Why the model keeps float32 under --dtype auto on a CPU that computes bfloat16 natively (None: it does not).
    cpu_float32_because: ClassVar[str | None] = None

    model: str = Field(description="model folder or hub id")
    port: int = Field(ge=1, le=65535, description="TCP port")
    host: str = Field("127.0.0.1", description="bind address; anything but loopback should set an API key")
    device: Device = Field("auto", description="auto picks cuda, then mps, then cpu")
    dtype: DType = Field(
        "auto",
        description="auto: bfloat16 on CUDA and on a CPU that computes it natively (AVX-512 BF16, AMX, Arm BF16), "
        "float32 elsewhere; /info says which and why",
    )
    compile: bool = Field(False, description="torch.compile the model: slower start, faster forward passes on a GPU")
    force_cpu: bool = Field(
        False,
        validation_alias=AliasChoices("force_cpu"),
        description="FORCE_CPU=1 forces the CPU whatever --device says",
    )
    api_key: SecretStr | None = Field(
        None, description="if set, every route but /health and /metrics needs 'Authorization: Bearer KEY'"
    )
    api_key_file: Path | None = Field(
        None, description="read api_key from this file (a Docker or compose secret): it stays out of the environment"
    )
    admin_key: SecretStr | None = Field(
        None,
        description="if set, only this key may call /admin/sleep and /admin/wake (the api_key gets 403 there); "
        "without it, the api_key may (or anyone, without one)",
    )
    admin_key_file: Path | None = Field(None, description="read admin_key from this file")
    instance_id: str | None = Field(
        None,
        max_length=128,
        description="an id the launcher gives this process: GET /health says it (instance), so that the launcher "
        "knows the answer came from the process it started and not from another program on the port",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
    log_file: str | None = Field(
        None, description="write the log to this file instead of stderr, rotated at 20 MB, 5 old files kept"
    )

    # Batching: requests from many clients share one forward pass.
    max_batch_size: int = Field(32, ge=1, description="items per forward pass")
    max_batch_wait_ms: float = Field(5.0, ge=0, description="how long a batch waits for more items to arrive")
    max_queue_items: int = Field(4096, ge=1, description="items waiting for the model; past it requests get 429")
    request_timeout_s: float = Field(120.0, gt=0, description="longest a request waits for its vectors (then 503)")

    # Limits, enforced before any heavy work.
    max_items_per_request: int = Field(256, ge=1, description="images or texts in one request")
    max_text_chars: int = Field(20_000, ge=1, description="characters in one text")
    max_body_bytes: int = Field(32 * MB, ge=1, description="bytes of one request body, checked while it is read")
    cors_origins: list[str] = Field(
        default_factory=list,
        description='browser origins allowed by CORS and to POST, e.g. ["http://localhost:3000"]; none by default',
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description='Host header names accepted, e.g. ["embed.example.com", "*.example.com"] or ["*"]; empty: on a '
        "loopback address only loopback names and IP addresses (stops DNS rebinding), elsewhere any",
    )

    # Connections: what a client may hold before its request reaches the app, enforced by the HTTP server.
    max_connections: int = Field(
        1000, ge=1, description="open connections; past it a new connection gets 503 at once and is closed"
    )
    max_header_bytes: int = Field(
        64 * 1024, ge=1024, description="bytes of the request line and headers of one request; past it 431"
    )
    header_timeout_s: float = Field(
        10.0, gt=0, description="time a connection has to send a complete request line and headers (then closed)"
    )
    body_timeout_s: float = Field(60.0, gt=0, description="time a client has to send the whole request body (408)")
    # Sleeping: the model's memory goes back to the system while it is not used (the GPU is shared with an image
    # generator), and comes back with the next request.
    idle_sleep_s: float = Field(
        0.0, ge=0, description="after this many seconds with no request waiting or running, the model sleeps; 0: never"
    )
    sleep_mode: Literal["auto", "offload", "unload"] = Field(
        "auto",
        description="offload: weights to host memory, a wake is a copy; unload: weights dropped, a wake reloads them "
        "from the folder; auto: offload on CUDA, unload elsewhere",
    )
    shutdown_timeout_s: float = Field(
        30.0, ge=0, description="on SIGTERM/SIGINT/SIGHUP, time to finish queued requests; the rest get 503"
    )

    @model_validator(mode="after")
    def _keys_from_files(self) -> ServiceSettings:
        for name in ("api_key", "admin_key"):
            path: Path | None = getattr(self, f"{name}_file")
            if path is None:
                continue
            if getattr(self, name) is not None:
                raise ValueError(f"{name} and {name}_file: give one of them, not both")
            setattr(self, name, SecretStr(read_key_file(path, f"{name}_file")))
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # init (the CLI, when parsed by load_settings) > SERVICE_* > EMBED_* > defaults
        service_env = EnvSettingsSource(settings_cls, env_prefix=cls.service_env_prefix)
        return (init_settings, service_env, env_settings)


class ImageLimits(BaseSettings):
    """Mixin for services that take images (and text in the same space)."""

    modalities: ClassVar[tuple[Modality, ...]] = ("image", "text")

    max_image_bytes: int = Field(50 * MB, ge=1, description="bytes of one encoded image")
    max_image_pixels: int = Field(
        200_000_000,
        ge=1,
        description="pixels of one image, from its header (decompression-bomb guard; admits 100+ MP panoramas, "
        "which as JPEGs are decoded at reduced scale)",
    )
    max_decoded_pixels: int = Field(
        DEFAULT_MAX_DECODED_PIXELS,
        ge=1,
        description="pixels decoded at full size: one image (every format but JPEG, which is decoded at reduced "
        "scale) may have at most this many, and images of more than 4 MP being decoded at once share this budget "
        "(the rest wait)",
    )
    max_body_bytes: int = Field(256 * MB, ge=1, description="bytes of one request body, checked while it is read")
    jpeg_draft: bool = Field(True, description="decode large JPEGs at reduced scale (at least 2x the model input)")
    decode_threads: int = Field(0, ge=0, description="image decoding threads; 0 = one per CPU core")


def read_key_file(path: Path, what: str) -> str:
    """A key from a secret file: its content without the line break an editor or ``echo`` leaves at the end."""
    try:
        key = path.expanduser().read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what}: cannot read {path} ({exc.__class__.__name__}: {exc})") from None
    if not key:
        raise ValueError(f"{what}: {path} is empty")
    return key


def limit_hint(name: str, value: int) -> str:
    """ "max_text_chars=20000 (raise it with --max-text-chars or EMBED_MAX_TEXT_CHARS)" for error messages."""
    return f"{name}={value} (raise it with --{name.replace('_', '-')} or EMBED_{name.upper()})"


SettingsT = TypeVar("SettingsT", bound=ServiceSettings)


def default_model(local_path: str, hub_id: str) -> str:
    """The conventional local folder (where existing deployments keep the weights) when it exists, else the hub id."""
    return local_path if Path(local_path).is_dir() else hub_id


def env_names(settings_cls: type[ServiceSettings], name: str) -> list[str]:
    """The environment variables a setting reads, the one that wins first."""
    field = settings_cls.model_fields[name]
    if isinstance(field.validation_alias, AliasChoices):  # read as it is, without a prefix (FORCE_CPU)
        return [str(choice).upper() for choice in field.validation_alias.choices]
    return [f"{settings_cls.service_env_prefix}{name.upper()}", f"EMBED_{name.upper()}"]


def _shown_default(value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[]" if not value else ",".join(map(str, value))
    return str(value)


def render_help(settings_cls: type[ServiceSettings], program: str) -> str:
    """--help: every flag with the environment variables it reads and its real default (a default that depends on
    the machine, such as the model folder, is shown as it resolves here)."""
    lines = [
        f"usage: {program} [--FLAG VALUE ...]",
        "",
        "Every flag can also be set by environment variable; a flag wins over the first variable named, which wins",
        "over the second, which wins over the default.",
        "",
    ]
    for name, field in settings_cls.model_fields.items():
        flag = "--" + name.replace("_", "-")
        choices = get_args(field.annotation) if get_origin(field.annotation) is Literal else ()
        if field.annotation is bool:
            flag = f"{flag} / --no-{flag[2:]}"
        elif choices:
            flag = f"{flag} {{{','.join(map(str, choices))}}}"
        else:
            flag = f"{flag} VALUE"
        default = field.get_default(call_default_factory=True)
        lines.append(f"  {flag}")
        lines.append(f"      {field.description or ''}")
        lines.append(f"      env: {', '.join(env_names(settings_cls, name))}; default: {_shown_default(default)}")
    return "\n".join(lines) + "\n"


def load_settings(settings_cls: type[SettingsT], argv: list[str] | None = None) -> SettingsT:
    """Parse flags and environment; print a short message and exit 2 on a bad value (no traceback)."""
    args = sys.argv[1:] if argv is None else argv
    if "-h" in args or "--help" in args:
        sys.stdout.write(render_help(settings_cls, Path(sys.argv[0]).name))
        raise SystemExit(0)
    try:
        return CliApp.run(settings_cls, cli_args=args)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors())
        sys.stderr.write(f"error: invalid setting: {problems}\n")
        raise SystemExit(2) from None
