"""Model server configuration: TF Serving's ``model_config_list`` text proto, validated at load.

The same ``deploy/serving/models.config`` serves docker compose (base paths ``/models/<name>``,
the compose volume) and local processes: with ``base_path_prefix`` every base path is re-rooted
to ``<prefix>/<last component of base_path>``, e.g. ``$STEMLAB_DATA/models/guitar``.
"""

from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2


class ConfigError(ValueError):
    """The model config file cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class ModelSpec:
    """One served model: where its version folders live and which versions to serve.

    ``version_policy`` is ``"latest"`` (the ``latest_count`` highest versions), ``"all"`` or
    ``"specific"`` (exactly ``specific_versions``).
    """

    name: str
    base_path: Path
    version_policy: str = "latest"
    latest_count: int = 1
    specific_versions: frozenset[int] = frozenset()
    version_labels: dict[str, int] = field(default_factory=dict)


def rebase(base_path: str, prefix: str | Path | None) -> Path:
    """``/models/guitar`` -> ``<prefix>/guitar`` when a prefix is given, else the path itself."""
    if prefix is None or str(prefix) == "":
        return Path(base_path)
    name = PurePosixPath(base_path.rstrip("/")).name
    if not name:
        raise ConfigError(f"base_path {base_path!r} has no last component to re-root under {prefix}")
    return Path(prefix) / name


def specs_from_proto(
    config: model_server_config_pb2.ModelServerConfig, base_path_prefix: str | Path | None = None
) -> list[ModelSpec]:
    """Validate a ModelServerConfig message and turn it into ModelSpecs."""
    if config.WhichOneof("config") == "custom_model_config":
        raise ConfigError("custom_model_config is not supported; use model_config_list")
    specs: list[ModelSpec] = []
    seen: set[str] = set()
    for model in config.model_config_list.config:
        if not model.name:
            raise ConfigError("a model config has no name")
        if model.name in seen:
            raise ConfigError(f"model {model.name!r} is configured twice")
        seen.add(model.name)
        if not model.base_path:
            raise ConfigError(f"model {model.name!r} has no base_path")
        if model.model_platform not in ("", "tensorflow"):
            raise ConfigError(f"model {model.name!r}: model_platform {model.model_platform!r} is not supported")
        policy = model.model_version_policy
        which = policy.WhichOneof("policy_choice")
        if which == "all":
            kwargs = {"version_policy": "all"}
        elif which == "specific":
            if not policy.specific.versions:
                raise ConfigError(f"model {model.name!r}: specific version policy lists no versions")
            kwargs = {"version_policy": "specific", "specific_versions": frozenset(policy.specific.versions)}
        else:
            count = policy.latest.num_versions if which == "latest" and policy.latest.num_versions else 1
            kwargs = {"version_policy": "latest", "latest_count": int(count)}
        specs.append(
            ModelSpec(
                name=model.name,
                base_path=rebase(model.base_path, base_path_prefix),
                version_labels={str(k): int(v) for k, v in model.version_labels.items()},
                **kwargs,
            )
        )
    return specs


def outside_roots(named_paths: list[tuple[str, Path]], roots: list[Path]) -> str | None:
    """Why the first (model name, base path) outside every one of ``roots`` may not be loaded, or
    None when all are inside. Paths are resolved first, so ``..`` and links cannot leave them."""
    for name, base_path in named_paths:
        where = Path(base_path).resolve()
        if not any(where == root or root in where.parents for root in roots):
            return (f"model {name!r}: base_path {base_path} is outside the model folders this server may load "
                    f"({', '.join(map(str, roots)) or 'none'})")
    return None


def load_model_config(path: str | Path, base_path_prefix: str | Path | None = None) -> list[ModelSpec]:
    """Read a ``model_config_list`` text proto file (the format of ``--model_config_file``)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"cannot read model config {path}: {error.strerror or error}") from error
    config = model_server_config_pb2.ModelServerConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as error:
        raise ConfigError(f"model config {path} is not a valid ModelServerConfig text proto: {error}") from error
    specs = specs_from_proto(config, base_path_prefix)
    if not specs:
        raise ConfigError(f"model config {path} configures no models")
    return specs


def rebased_config_text(path: str | Path, base_path_prefix: str | Path) -> str:
    """The config file's text proto with every base_path re-rooted under ``base_path_prefix``.

    For a real ``tensorflow_model_server`` run outside Docker, which has no prefix flag.
    """
    path = Path(path)
    config = model_server_config_pb2.ModelServerConfig()
    try:
        text_format.Parse(path.read_text(encoding="utf-8"), config)
    except (OSError, text_format.ParseError) as error:
        raise ConfigError(f"cannot use model config {path}: {error}") from error
    specs_from_proto(config, base_path_prefix)  # validates
    for model in config.model_config_list.config:
        model.base_path = str(rebase(model.base_path, base_path_prefix))
    return text_format.MessageToString(config)


def main(argv: list[str] | None = None) -> int:
    """python -m services.serving.config FILE --model_base_path_prefix DIR --out LOCAL_FILE"""
    import argparse
    import sys

    from services.common.paths import atomic_write_text

    parser = argparse.ArgumentParser(prog="python -m services.serving.config",
                                     description="write a copy of a models.config with re-rooted base paths")
    parser.add_argument("config_file")
    parser.add_argument("--model_base_path_prefix", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    try:
        atomic_write_text(Path(args.out), rebased_config_text(args.config_file, args.model_base_path_prefix))
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
