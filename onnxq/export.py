"""Export transformers models to ONNX with optimum-onnx, into a folder ``onnxq quantize`` accepts.

:func:`export` takes a local ``save_pretrained`` folder (exported with optimum's ``main_export``) or a
``transformers.PreTrainedModel`` in memory (``onnx_export_from_model``) and writes one folder holding
``model.onnx`` with the model's config, generation config and tokenizer files beside it.

torch, transformers and optimum-onnx (the ``export`` extra) are imported inside the functions, so
importing onnxq stays cheap and works without them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onnxq.errors import ExportError, MissingDependencyError, ModelLoadError, OutputError

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18
MODEL_FILE = "model.onnx"
INSTALL_HINT = 'install the export extra: pip install "onnxq[export]"'
_WITH_PAST = "-with-past"
# The opsets torch's TorchScript exporter (the one optimum-onnx drives) can write.
_MIN_OPSET = 7
_MAX_OPSET_FALLBACK = 20
# Files of a save_pretrained folder that a tokenizer, processor or feature extractor is read from.
# They are copied verbatim next to the exported model (replacing optimum's re-serialised copies).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
)
# Copied only when optimum did not write its own (its copy may hold parameters moved out of config.json).
_GENERATION_CONFIG = "generation_config.json"
_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json", "*.bin.index.json")
_NOISY_LOGGERS = ("optimum", "transformers", "torch")


@dataclass(frozen=True)
class _Deps:
    transformers: Any
    main_export: Callable[..., Any]
    onnx_export_from_model: Callable[..., Any]
    tasks: Any  # optimum's TasksManager


def export(
    model: str | os.PathLike | Any,
    output_dir: str | os.PathLike,
    *,
    task: str | None = None,
    opset: int | None = None,
    with_past: bool | None = None,
    tokenizer: Any | None = None,
) -> Path:
    """Export a transformers model to ONNX in ``output_dir`` and return the path of its ``.onnx`` file.

    ``model`` is a local folder written by ``save_pretrained`` (``config.json`` and weights) or a
    ``transformers.PreTrainedModel``; for an in-memory model, ``tokenizer`` (anything with
    ``save_pretrained``) is saved beside the export. A folder's tokenizer / processor files are copied
    verbatim, so ``output_dir`` is usable on its own (e.g. by ``optimum.onnxruntime`` or ``onnxq
    quantize output_dir``).

    Defaults, and why:

    - ``task=None`` lets optimum infer the task from the model class (``config.architectures`` for a
      folder): ``BertModel`` → ``feature-extraction``, ``GPT2LMHeadModel`` / ``LlamaForCausalLM`` →
      ``text-generation``. Synonyms (``causal-lm``, ``masked-lm``, ...) are accepted.
    - ``with_past=None`` keeps optimum's default: a decoder gets its KV cache (``...-with-past``) where
      the architecture supports one. ``True`` / ``False`` force ``<task>-with-past`` / ``<task>`` (e.g.
      ``text-generation`` without cache, for scoring whole windows, which has fewer inputs to calibrate).
    - ``opset=None`` means opset 18, the minimum optimum-onnx recommends for every architecture it
      supports; lower opsets only log a warning, above what torch's exporter writes is refused.
    - Exports are fp32 on CPU, without optimum's torch-vs-ONNX validation run (it only logs warnings
      and doubles the time); the written model is checked with ``onnx.checker`` instead.
    - Only exports that are one ONNX graph are supported (encoders, decoder-only LMs, vision encoders);
      encoder-decoder models, which optimum splits into several graphs, are refused.

    Guarantees: nothing is downloaded (the Hugging Face hub is switched to offline mode for the call,
    then restored); the input folder is never written to; ``output_dir`` must not exist or be empty,
    and appears only complete — the export runs in a temporary folder beside it that is renamed into
    place, and is removed on any error. An in-memory model keeps its ``config.use_cache`` (optimum may
    move generation parameters from its config to its generation config).

    Errors a user can cause raise :class:`~onnxq.errors.OnnxqError` subclasses with a one-line message:
    ``ModelLoadError`` (no such folder, no ``config.json`` or weights), ``ExportError`` (unsupported
    architecture or task, with the valid tasks listed; the exporter failed), ``OutputError``,
    ``MissingDependencyError`` (torch / transformers / optimum-onnx not installed).
    """
    source = _check_source(model) if isinstance(model, str | os.PathLike) else None
    output_dir = _check_output(Path(output_dir), source)
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int)):
        raise ExportError(f"opset must be an integer, not {opset!r}")
    if with_past is not None and not isinstance(with_past, bool):
        raise ExportError(f"with_past must be True, False or None, not {with_past!r}")
    if task is not None and (not isinstance(task, str) or not task.strip()):
        raise ExportError(f"task must be a non-empty string such as 'feature-extraction', not {task!r}")
    if tokenizer is not None and source is not None:
        raise ExportError("tokenizer= is only for an in-memory model; a folder's tokenizer files are copied")
    if tokenizer is not None and not hasattr(tokenizer, "save_pretrained"):
        raise ExportError(
            f"tokenizer must be a transformers tokenizer or processor, not {type(tokenizer).__name__}"
        )
    deps = _require()
    if source is None and not isinstance(model, deps.transformers.PreTrainedModel):
        raise ModelLoadError(
            "model must be a save_pretrained folder or a transformers.PreTrainedModel, "
            f"not {type(model).__name__}"
        )
    verbose = log.isEnabledFor(logging.INFO)
    with _quiet(verbose), _offline():
        config = _load_config(deps, source) if source is not None else model.config
        model_type = getattr(config, "export_model_type", None) or config.model_type
        if getattr(config, "is_encoder_decoder", False):
            raise ExportError(
                f"{model_type} is an encoder-decoder model, which optimum exports as several ONNX graphs; "
                "onnxq export supports single-graph models (use optimum-cli export onnx for this one)"
            )
        supported = _supported_tasks(deps, model_type)
        inferred = _infer_task(deps, config, model if source is None else None)
        resolved = _resolve_task(deps, model_type, supported, inferred, task, with_past)
        opset = _resolve_opset(opset)
        what = str(source) if source is not None else type(model).__name__
        log.info("exporting %s (%s) for %s at opset %d to %s", what, model_type, resolved, opset, output_dir)
        tmp = _make_temp_dir(output_dir)
        try:
            if source is not None:
                _export_folder(deps, source, tmp, resolved, opset)
            else:
                _export_in_memory(deps, model, tmp, resolved, opset, tokenizer)
            main = _main_file(tmp)
            _check_onnx(main)
            _move_into_place(tmp, output_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    path = output_dir / main.name
    log.info("wrote %s", path)
    return path


def _require() -> _Deps:
    """torch, transformers and optimum-onnx, or a MissingDependencyError naming the pip command."""
    try:
        import torch
        import transformers
        from optimum.exporters.onnx import main_export, onnx_export_from_model
        from optimum.exporters.tasks import TasksManager
    except ImportError as exc:
        raise MissingDependencyError(
            f"exporting needs torch, transformers and optimum-onnx ({_one_line(exc)}); {INSTALL_HINT}"
        ) from None
    except RuntimeError as exc:  # transformers' lazy modules wrap the ImportError of a submodule
        if not isinstance(exc.__cause__, ImportError):
            raise
        raise MissingDependencyError(
            f"exporting needs torch, transformers and optimum-onnx ({_one_line(exc.__cause__)}); "
            f"{INSTALL_HINT}"
        ) from None
    del torch  # imported only to fail early, with the install hint, when it is missing
    return _Deps(transformers, main_export, onnx_export_from_model, TasksManager)


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type when empty), at most ``limit`` characters."""
    text = str(exc).strip().splitlines()
    line = text[0].strip() if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _check_source(model: str | os.PathLike) -> Path:
    """The model folder, once it is known to exist and to hold ``config.json`` and weights."""
    path = Path(model)
    if not path.exists():
        raise ModelLoadError(
            f"model folder {path} does not exist; pass a local folder written by save_pretrained "
            "(nothing is downloaded)"
        )
    if not path.is_dir():
        raise ModelLoadError(
            f"{path} is a file, not a model folder; pass the folder written by save_pretrained"
        )
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"{path} has no config.json, so it is not a transformers model folder; "
            "pass the folder written by model.save_pretrained(...)"
        )
    if not any(any(path.glob(pattern)) for pattern in _WEIGHT_PATTERNS):
        raise ModelLoadError(
            f"{path} has no weights (model.safetensors or pytorch_model.bin); "
            "save the model with model.save_pretrained(...) into it"
        )
    return path


def _check_output(output_dir: Path, source: Path | None) -> Path:
    """``output_dir`` once it is known to be creatable: absent or an empty folder, parent writable."""
    parent = output_dir.parent if str(output_dir.parent) else Path(".")
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputError(f"output {output_dir} is a file; pass a folder to export into")
    if output_dir.is_dir() and any(output_dir.iterdir()):
        raise OutputError(
            f"output folder {output_dir} is not empty; remove it or choose a new folder to export into"
        )
    if source is not None and output_dir.resolve() == source.resolve():
        raise OutputError(f"output folder {output_dir} is the model folder; choose another one")
    if not parent.is_dir():
        raise OutputError(f"folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"folder {parent} is not writable; choose another output folder")
    return output_dir


def _move_into_place(tmp: Path, output_dir: Path) -> None:
    """Rename the finished export ``tmp`` to ``output_dir`` (absent or empty, as checked before)."""
    try:
        if output_dir.is_dir():
            output_dir.rmdir()  # os.replace cannot replace a folder on every platform
        os.replace(tmp, output_dir)
    except OSError as exc:
        raise OutputError(
            f"cannot move the export into {output_dir} ({exc.strerror}); remove it or choose a new folder"
        ) from None


def _make_temp_dir(output_dir: Path) -> Path:
    """A new empty folder beside ``output_dir`` (created with the usual permissions, unlike mkdtemp)."""
    parent = output_dir.parent if str(output_dir.parent) else Path(".")
    for _ in range(100):
        tmp = parent / f".{output_dir.name}.export-{uuid.uuid4().hex[:12]}"
        try:
            tmp.mkdir()
        except FileExistsError:
            continue
        except OSError as exc:
            raise OutputError(f"cannot create a folder in {parent}: {exc.strerror}") from None
        return tmp
    raise OutputError(f"cannot create a temporary folder in {parent}")


@contextlib.contextmanager
def _quiet(verbose: bool) -> Iterator[None]:
    """Silence the warnings of torch's tracer, transformers and optimum unless ``verbose``."""
    if verbose:
        yield
        return
    import torch

    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    # torch's TorchScript exporter switches its C++ log on (torch.onnx setup_onnx_logging tests a function
    # for truth) and dumps the whole IR graph to stderr when an export fails; that dump goes too.
    jit_log = getattr(torch._C, "_jit_onnx_log", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        if jit_log is not None:
            torch._C._jit_onnx_log = _no_log
        try:
            yield
        finally:
            if jit_log is not None:
                torch._C._jit_onnx_log = jit_log
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def _no_log(*_args: Any) -> None:
    """Stands in for torch's ONNX export log while the export is quiet."""


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """Keep huggingface_hub and transformers offline for the duration, then restore their settings.

    Both read ``HF_HUB_OFFLINE`` once at import, so the flags they keep are switched as well as the
    environment variables.
    """
    import huggingface_hub.constants as hub_constants
    import transformers.utils.hub as transformers_hub

    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    env = {name: os.environ.get(name) for name in names}
    hub_flag = hub_constants.HF_HUB_OFFLINE
    has_tf_flag = hasattr(transformers_hub, "_is_offline_mode")
    tf_flag = getattr(transformers_hub, "_is_offline_mode", None)
    for name in names:
        os.environ[name] = "1"
    hub_constants.HF_HUB_OFFLINE = True
    if has_tf_flag:
        transformers_hub._is_offline_mode = True
    try:
        yield
    finally:
        for name, value in env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        hub_constants.HF_HUB_OFFLINE = hub_flag
        if has_tf_flag:
            transformers_hub._is_offline_mode = tf_flag


def _load_config(deps: _Deps, source: Path) -> Any:
    """The folder's transformers config, or a ModelLoadError saying what is wrong with it."""
    try:
        json.loads((source / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelLoadError(
            f"{source / 'config.json'} is not valid JSON ({_one_line(exc)}); re-save the model"
        ) from None
    try:
        return deps.transformers.AutoConfig.from_pretrained(source, local_files_only=True)
    except Exception as exc:  # unknown model_type, remote code, malformed fields
        raise ModelLoadError(
            f"transformers cannot read {source / 'config.json'} ({_one_line(exc)}); "
            "check the model type and the installed transformers version"
        ) from None


def _supported_tasks(deps: _Deps, model_type: str) -> list[str]:
    """The tasks optimum-onnx can export ``model_type`` for, or an ExportError."""
    if model_type not in deps.tasks._SUPPORTED_MODEL_TYPE:
        raise ExportError(
            f"optimum-onnx has no ONNX export for {model_type!r} models; "
            "use a supported architecture (see optimum-onnx's list) or export with torch.onnx directly"
        )
    try:
        tasks = deps.tasks.get_supported_tasks_for_model_type(model_type, "onnx", library_name="transformers")
    except KeyError:
        raise ExportError(f"optimum-onnx has no ONNX export for {model_type!r} models") from None
    return list(tasks)


def _infer_task(deps: _Deps, config: Any, model: Any | None) -> str | None:
    """The task optimum infers from the model class (or the folder's ``config.architectures``)."""
    classes = [type(model)] if model is not None else []
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(deps.transformers, name, None) if isinstance(name, str) else None
        if isinstance(cls, type):
            classes.append(cls)
    for cls in classes:
        try:
            return deps.tasks.infer_task_from_model(cls)
        except (ValueError, KeyError):
            continue
    return None


def _resolve_task(
    deps: _Deps,
    model_type: str,
    supported: list[str],
    inferred: str | None,
    task: str | None,
    with_past: bool | None,
) -> str:
    """The optimum task to export: ``task`` (or the inferred one) with ``with_past`` applied."""
    valid = f"valid tasks for {model_type}: {', '.join(supported)}"
    if task is None:
        if inferred is None:
            if "feature-extraction" not in supported:
                raise ExportError(f"cannot infer the task of this {model_type} model; pass one ({valid})")
            inferred = "feature-extraction"
        base = inferred.removesuffix(_WITH_PAST)
        if with_past is None:  # optimum's default: the KV cache wherever the architecture has one
            name = base + _WITH_PAST if base + _WITH_PAST in supported else base
        else:
            name = base + _WITH_PAST if with_past else base
    else:
        name = deps.tasks.map_from_synonym(task.strip())
        if with_past is not None:
            if name.endswith(_WITH_PAST) and not with_past:
                raise ExportError(
                    f"task {task!r} asks for past key values but with_past=False; "
                    f"pass task {name.removesuffix(_WITH_PAST)!r} or drop with_past"
                )
            base = name.removesuffix(_WITH_PAST)
            name = base + _WITH_PAST if with_past else base
    if name in supported:
        return name
    base = name.removesuffix(_WITH_PAST)
    if base not in deps.tasks.get_all_tasks():
        raise ExportError(f"unknown task {task or name!r}; {valid}")
    if base in supported:
        raise ExportError(
            f"{model_type} models have no KV cache to export ({name!r} is not supported); {valid}"
        )
    raise ExportError(f"{model_type} models cannot be exported for task {name!r}; {valid}")


def _resolve_opset(opset: int | None) -> int:
    """``opset`` (or the default), checked against what torch's TorchScript exporter can write."""
    if opset is None:
        return DEFAULT_OPSET
    try:
        from torch.onnx import _constants

        max_opset = int(getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", _MAX_OPSET_FALLBACK))
    except (ImportError, TypeError, ValueError):
        max_opset = _MAX_OPSET_FALLBACK
    if not _MIN_OPSET <= opset <= max_opset:
        raise ExportError(
            f"opset {opset} is out of range; torch's ONNX exporter writes opsets {_MIN_OPSET}-{max_opset}"
        )
    if opset < DEFAULT_OPSET:
        log.warning(
            "opset %d is below %d, the minimum optimum-onnx recommends; the export may fail",
            opset,
            DEFAULT_OPSET,
        )
    return opset


def _export_folder(deps: _Deps, source: Path, tmp: Path, task: str, opset: int) -> None:
    """Export ``source`` with optimum's ``main_export`` into ``tmp`` and copy its tokenizer files there."""
    try:
        deps.main_export(
            str(source),
            tmp,
            task=task,
            opset=opset,
            device="cpu",
            dtype="fp32",
            framework="pt",
            library_name="transformers",
            local_files_only=True,
            do_validation=False,
        )
    except Exception as exc:
        raise ExportError(f"optimum could not export {source} for {task}: {_describe(exc)}") from exc
    copies = [name for name in TOKENIZER_FILES if (source / name).is_file()]
    if (source / _GENERATION_CONFIG).is_file() and not (tmp / _GENERATION_CONFIG).exists():
        copies.append(_GENERATION_CONFIG)
    for name in copies:
        try:
            shutil.copyfile(source / name, tmp / name)
        except OSError as exc:
            raise OutputError(f"cannot copy {source / name} beside the export: {exc.strerror}") from None


def _export_in_memory(deps: _Deps, model: Any, tmp: Path, task: str, opset: int, tokenizer: Any) -> None:
    """Export ``model`` with ``onnx_export_from_model`` into ``tmp``; save ``tokenizer`` beside it.

    ``model.config.use_cache`` is set to match the task during the export (as ``main_export`` does)
    and restored afterwards.
    """
    config = model.config
    had_use_cache = hasattr(config, "use_cache")
    use_cache = getattr(config, "use_cache", None)
    device = getattr(getattr(model, "device", None), "type", "cpu")
    try:
        if had_use_cache:
            config.use_cache = task.endswith(_WITH_PAST)
        deps.onnx_export_from_model(
            model,
            tmp,
            task=task,
            opset=opset,
            device=device if device in ("cpu", "cuda") else "cpu",
            do_validation=False,
            preprocessors=[tokenizer] if tokenizer is not None else None,
        )
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    except Exception as exc:
        raise ExportError(
            f"optimum could not export {type(model).__name__} for {task}: {_describe(exc)}"
        ) from exc
    finally:
        if had_use_cache:
            config.use_cache = use_cache


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {_one_line(exc)}"


def _main_file(folder: Path) -> Path:
    """The exported graph: ``model.onnx``, or the single ``.onnx`` file optimum wrote."""
    if (folder / MODEL_FILE).is_file():
        return folder / MODEL_FILE
    found = sorted(p.name for p in folder.glob("*.onnx"))
    if len(found) == 1:
        return folder / found[0]
    raise ExportError(
        f"optimum wrote {len(found)} ONNX files ({', '.join(found) or 'none'}); "
        "onnxq export supports models exported as a single graph"
    )


def _check_onnx(path: Path) -> None:
    """``onnx.checker`` on the written file (by path, so external data over 2 GB is fine)."""
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:
        raise ExportError(f"the exported {path.name} is not a valid ONNX model: {_one_line(exc)}") from exc
