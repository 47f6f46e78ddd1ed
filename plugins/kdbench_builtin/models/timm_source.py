"""``timm:NAME`` — any model of `timm <https://github.com/huggingface/pytorch-image-models>`_ by
name, when timm is installed (``pip install 'kdbench[timm]'``); kdbench never requires it.

Models are always built with ``pretrained=False`` (random initialisation): nothing is downloaded.
``in_chans`` and ``num_classes`` come from the dataset. A model with a fixed input size (ViTs:
``pretrained_cfg.fixed_input_size``) is built for the dataset's ``(H, W)`` via ``img_size``.

Taps come from the model's ``feature_info`` (a list of dicts with ``module``, ``num_chs``,
``reduction`` and, for EfficientNet-style models, ``stage`` and ``hook_type``; see timm's
``timm/models/_features.py: FeatureInfo``): the first entry is ``stem`` when it is the stem
(``stage == 0``, or no ``stage`` key and a reduction of at most 2), the others ``stage1..stageN``
in order; ``pool`` is the input of ``get_classifier()`` (absent when the classifier is
``Identity``). A model without ``feature_info`` has only ``pool``.

timm is imported only when a ``timm:`` model is resolved, never when kdbench starts.
"""
from __future__ import annotations

from functools import partial

from torch import nn

from kdbench.contracts import Model, ModelSource, Tap
from kdbench.errors import KdbenchError, closest

INSTALL = "pip install timm (or pip install 'kdbench[timm]')"


def _timm():
    """The timm module, or a one-line KdbenchError saying how to get it."""
    try:
        import timm
    except ImportError as exc:
        if exc.name in (None, "timm"):
            raise KdbenchError(
                f"timm:NAME models need the timm package, which is not installed; {INSTALL}") from None
        raise KdbenchError(  # timm is there but one of its imports is not (torchvision, ...)
            f"timm is installed but importing it failed ({type(exc).__name__}: {_line(exc)}); "
            f"install what it names, or reinstall timm with its dependencies") from None
    except Exception as exc:  # e.g. a torchvision that does not match torch
        raise KdbenchError(
            f"timm is installed but failed to import ({type(exc).__name__}: {_line(exc)}); "
            "check that timm, torch and torchvision versions match"
        ) from None
    return timm


def _line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no message"


def _unknown(timm, name: str) -> KdbenchError:
    base = name.split(".", 1)[0]
    hint = ""
    try:
        # names that start with it (timm:vit_tiny -> vit_tiny_patch16_224, ...), else the closest
        # spellings (timm:resnt18 -> resnet18), else names that contain it
        starting = list(timm.list_models(f"{base}*"))
        if starting:
            hint = _some("names starting with it", starting)
        else:
            hint = closest(base, list(timm.list_models()))
        if not hint:
            containing = list(timm.list_models(f"*{base}*"))
            if containing:
                hint = _some("names containing it", containing)
    except Exception:
        pass
    return KdbenchError(f"timm has no model {name!r}{hint} (see timm.list_models())")


def _some(what: str, names: list[str], n: int = 5) -> str:
    more = f", … ({len(names)} in all)" if len(names) > n else ""
    return f"; {what}: {', '.join(names[:n])}{more}"


def resolve(name: str) -> Model:
    """The Model for ``timm:NAME`` (checked against timm's registry now, built on ``make``)."""
    if not name:
        raise KdbenchError("give a timm model name after the prefix, e.g. timm:resnet18")
    if ":" in name or "/" in name:
        # timm would fetch 'hf-hub:org/model' configs from the Hugging Face Hub
        raise KdbenchError(f"timm:{name} names a remote model; kdbench builds timm models by "
                           "architecture name only (e.g. timm:resnet18), nothing is downloaded")
    timm = _timm()
    is_model = getattr(timm, "is_model", None)
    known = is_model(name) if is_model is not None else name.split(".", 1)[0] in set(timm.list_models())
    if not known:
        raise _unknown(timm, name)
    return Model(
        name=f"timm:{name}",
        build=partial(build, name),
        taps=taps,
        description=f"timm {name} (random init)",
    )


def _fixed_size(timm, name: str):
    """``(H, W)`` a model is built for when timm marks its input size fixed, else None."""
    get = getattr(timm, "get_pretrained_cfg", None)
    if get is None:
        return None
    try:
        cfg = get(name)
    except Exception:
        return None
    if cfg is None:
        return None
    value = (lambda k: cfg.get(k)) if isinstance(cfg, dict) else (lambda k: getattr(cfg, k, None))
    size = value("input_size")
    if not value("fixed_input_size") or not size or len(size) != 3:
        return None
    return tuple(size[1:])


def build(name: str, num_classes: int, input_shape, **kwargs) -> nn.Module:
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
        raise KdbenchError(f"model 'timm:{name}' takes images (C, H, W), not input shape {shape}")
    if kwargs.pop("pretrained", False):
        raise KdbenchError(f"model 'timm:{name}': kdbench never loads pretrained timm weights "
                           "(pretrained must stay False)")
    timm = _timm()
    if "img_size" not in kwargs:
        fixed = _fixed_size(timm, name)
        if fixed is not None and fixed != shape[1:]:
            kwargs["img_size"] = shape[1:]
    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=shape[0], **kwargs)
    except Exception as exc:
        raise KdbenchError(
            f"timm could not build {name!r} for input shape {shape} and {num_classes} classes: "
            f"{type(exc).__name__}: {_line(exc)}"
        ) from None


def _feature_info(net: nn.Module) -> list[dict]:
    info = getattr(net, "feature_info", None)
    info = getattr(info, "info", info)  # a FeatureInfo object (features_only models) holds the list
    if not isinstance(info, (list, tuple)):
        return []
    return [fi for fi in info if isinstance(fi, dict) and isinstance(fi.get("module"), str)]


def _is_stem(fi: dict) -> bool:
    if "stage" in fi:
        return fi["stage"] == 0
    return fi.get("reduction", 99) <= 2


def taps(net: nn.Module) -> dict[str, Tap]:
    """``stem``/``stage1..N`` from ``feature_info``, ``pool`` = the classifier's input."""
    modules = dict(net.named_modules())
    out: dict[str, Tap] = {}
    infos = [fi for fi in _feature_info(net) if fi["module"] in modules]
    if infos and _is_stem(infos[0]):
        out["stem"] = Tap(infos[0]["module"], input=infos[0].get("hook_type") == "forward_pre")
        infos = infos[1:]
    for i, fi in enumerate(infos, start=1):
        out[f"stage{i}"] = Tap(fi["module"], input=fi.get("hook_type") == "forward_pre")
    pool = _classifier_name(net)
    if pool is not None:
        out["pool"] = Tap(pool, input=True)
    return out


def _classifier_name(net: nn.Module) -> str | None:
    get = getattr(net, "get_classifier", None)
    if get is None:
        return None
    try:
        clf = get()
    except Exception:
        return None
    if isinstance(clf, (tuple, list)):  # distilled models: (head, head_dist)
        clf = clf[0] if clf else None
    if not isinstance(clf, nn.Module) or isinstance(clf, nn.Identity):
        return None
    for dotted, module in net.named_modules():
        if module is clf and dotted:
            return dotted
    return None


MODELS = [
    ModelSource(
        prefix="timm",
        resolve=resolve,
        description="any timm model by name, e.g. timm:resnet18 (random init, nothing downloaded; "
                    "needs pip install timm)",
    )
]
