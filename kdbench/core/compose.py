"""Combined methods: ``a+b[+c…]`` trains one student with the terms of several methods.

Each part keeps its own hyperparameters (namespaced ``a.name``), taps, extra modules and
pre-stages; :class:`CombinedMethod` holds the callables of the combined :class:`Method`, each of
which forwards to the parts with what belongs to them.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from types import SimpleNamespace

from torch import nn

from kdbench.contracts import Defaults, Method, Outputs, Probe, Stage, Step
from kdbench.core.plugins import Entry
from kdbench.core.taps import wanted_taps
from kdbench.errors import KdbenchError


@dataclass(frozen=True)
class PartTaps:
    """The taps one part of a combined method asked for, on the student and on the teachers."""

    student: frozenset[str]
    teacher: frozenset[str]


class PartModules(nn.ModuleDict):
    """The extra modules of a combined method: one entry per part whose ``build`` returned a
    module, keyed by the part's name, plus ``part_taps`` — per part name (every part, with
    modules or not), the taps that part asked for, so that its loss is given only those."""

    part_taps: dict[str, PartTaps]

    def __init__(self, modules: dict[str, nn.Module], part_taps: dict[str, PartTaps]):
        super().__init__(modules)
        self.part_taps = part_taps


def part_hp(hp: SimpleNamespace, prefix: str) -> SimpleNamespace:
    """The hyperparameters named ``prefix…``, without the prefix (one part's own)."""
    n = len(prefix)
    return SimpleNamespace(**{k[n:]: v for k, v in vars(hp).items() if k.startswith(prefix)})


def _only(feats: dict, names: frozenset[str] | None) -> dict:
    return {k: v for k, v in feats.items() if names is None or k in names}


def _frozen(outputs: Outputs, names: frozenset[str] | None) -> Outputs:
    """A teacher's outputs as a part sees them: detached (teachers are frozen, whatever the part
    does) and limited to the part's own taps."""
    return replace(outputs, logits=outputs.logits.detach(),
                   feats={k: v.detach() for k, v in _only(outputs.feats, names).items()})


class CombinedMethod:
    """The callables of one combined method (a plain object: the :class:`Method` they are put
    into stays a frozen dataclass). ``parts`` are the methods combined, in order."""

    def __init__(self, parts: list[Method]):
        self.parts = parts
        self.prefix = {part.name: part.name + "." for part in parts}

    def hp_of(self, part: Method, hp: SimpleNamespace) -> SimpleNamespace:
        return part_hp(hp, self.prefix[part.name])

    def part_probe(self, part: Method, probe: Probe) -> Probe:
        """``probe`` as ``part`` sees it: its own hyperparameters and the shapes of its own taps."""
        hp = self.hp_of(part, probe.hp)
        teacher_taps = probe.teacher_taps if probe.teacher_shapes else None
        student_names, teacher_names = wanted_taps(part, hp, probe.student_taps, teacher_taps)
        return replace(
            probe, hp=hp,
            student_shapes={k: v for k, v in probe.student_shapes.items() if k in student_names},
            teacher_shapes={k: v for k, v in probe.teacher_shapes.items() if k in teacher_names},
        )

    def part_step(self, part: Method, step: Step) -> Step:
        """``step`` as ``part``'s loss sees it: its own hyperparameters, modules and taps, and
        the teachers' outputs detached. Without :class:`PartModules` (modules not built by
        :meth:`build`) the features are passed unfiltered."""
        taps = step.modules.part_taps[part.name] if isinstance(step.modules, PartModules) else None
        student_names = taps.student if taps is not None else None
        teacher_names = taps.teacher if taps is not None else None
        has_modules = step.modules is not None and part.name in step.modules
        return replace(
            step,
            hp=self.hp_of(part, step.hp),
            student=replace(step.student, feats=_only(step.student.feats, student_names)),
            teacher=_frozen(step.teacher, teacher_names) if step.teacher is not None else None,
            teachers=[_frozen(out, teacher_names) for out in step.teachers] if step.teachers is not None else None,
            modules=step.modules[part.name] if has_modules else None,
        )

    # ------------------------------------------------------------------ the Method's callables

    def taps(self, hp, student_taps, teacher_taps) -> list[str]:
        """The union of the parts' taps (in part order), each present on both networks."""
        out: list[str] = []
        for part in self.parts:
            student_names, teacher_names = wanted_taps(part, self.hp_of(part, hp), student_taps, teacher_taps)
            out += [n for n in student_names if n not in out and (teacher_taps is None or n in teacher_names)]
        return out

    def check(self, probe: Probe) -> None:
        for part in self.parts:
            if part.check is not None:
                part.check(self.part_probe(part, probe))

    def build(self, probe: Probe) -> PartModules:
        modules: dict[str, nn.Module] = {}
        taps: dict[str, PartTaps] = {}
        for part in self.parts:
            sub = self.part_probe(part, probe)
            taps[part.name] = PartTaps(frozenset(sub.student_shapes), frozenset(sub.teacher_shapes))
            built = part.build(sub) if part.build is not None else None
            if built is not None:
                modules[part.name] = built
        return PartModules(modules, taps)

    def loss(self, step: Step) -> dict:
        """The union of the parts' terms: ``"ce"`` only from the first part, another clashing
        name prefixed with its part's name."""
        terms: dict = {}
        for i, part in enumerate(self.parts):
            for key, value in part.loss(self.part_step(part, step)).items():
                if key == "ce" and i > 0:
                    continue  # cross-entropy on the labels is counted once: the first part's
                terms[key if key not in terms else f"{part.name}.{key}"] = value
        return terms

    def stages(self, hp) -> list[Stage]:
        """Every part's pre-stages, in order, named ``part.stage``."""
        out = []
        for part in self.parts:
            for stage in part.stages(self.hp_of(part, hp)) if part.stages is not None else []:
                epochs = self.prefix[part.name] + stage.epochs if isinstance(stage.epochs, str) else stage.epochs
                lr = self.prefix[part.name] + stage.lr if isinstance(stage.lr, str) else stage.lr
                out.append(replace(stage, name=f"{part.name}.{stage.name}", epochs=epochs, lr=lr,
                                   loss=self._stage_loss(part, stage)))
        return out

    def _stage_loss(self, part: Method, stage: Stage):
        def loss(step):
            return stage.loss(replace(self.part_step(part, step), stage=stage.name))
        return loss

    def peers(self, modules) -> list[nn.Module]:
        out = []
        for part in self.parts:
            if part.peers is not None and part.name in modules:
                out += list(part.peers(modules[part.name]))
        return out

    def train_data(self, probe, teacher_net, device):
        (part,) = [part for part in self.parts if part.train_data is not None]
        return part.train_data(self.part_probe(part, probe), teacher_net, device)


@dataclass(frozen=True)
class _Combined(Method):
    """The :class:`Method` of a combination: each part's defaults for a run are its own
    (``defaults_of``), so ``at+dkd`` on the embedded data runs at's and dkd's embedded values,
    as each does alone, not their declared CIFAR ones."""

    parts: tuple[Method, ...] = ()

    def defaults_of(self, dataset: str, teacher: str, student: str) -> Defaults | None:
        """Every part's first matching :attr:`Method.defaults_for` entry, namespaced; None when no
        part has one."""
        found = [(part, part.defaults_of(dataset, teacher, student)) for part in self.parts]
        found = [(part, entry) for part, entry in found if entry is not None]
        if not found:
            return None
        return Defaults({f"{part.name}.{key}": value for part, entry in found for key, value in entry.values.items()},
                        source=" + ".join(f"{part.name}: {entry.label()}" for part, entry in found))


def combine_methods(parts: list[Method]) -> Method:
    """``a+b``: both methods' terms on one student.

    Hyperparameters are namespaced by method (``at.beta``, ``kd.alpha``); taps are the union (each
    part's loss sees only its own); ``check`` runs both; the extra modules live in a
    :class:`PartModules` keyed by method name; pre-stages are both's, in order (named ``a.stage``).
    The loss is the union of the terms with cross-entropy counted once: the first part's ``"ce"``
    is kept and the later parts' ``"ce"`` dropped (so in ``at+kd`` CE has at's weight and KD is
    ``kd.alpha``·KD); another clashing term name is prefixed with its method's name.
    """
    if sum(part.train_data is not None for part in parts) > 1:
        raise KdbenchError("at most one part of a combined method may supply its own training data")
    combined = CombinedMethod(parts)
    hparams = tuple(replace(hparam, name=combined.prefix[part.name] + hparam.name)
                    for part in parts for hparam in part.hparams)
    any_callable = any(callable(part.taps) for part in parts)
    taps = combined.taps if any_callable else tuple(dict.fromkeys(tap for part in parts for tap in part.taps))
    return _Combined(
        parts=tuple(parts),
        name="+".join(part.name for part in parts),
        loss=combined.loss,
        description=" + ".join(part.description for part in parts),
        citation="; ".join(part.citation for part in parts if part.citation),
        hparams=hparams,
        taps=taps,
        build=combined.build,
        check=combined.check,
        stages=combined.stages if any(part.stages is not None for part in parts) else None,
        needs_teacher=any(part.needs_teacher for part in parts),
        uses_teachers=any(part.uses_teachers for part in parts),
        peers=combined.peers if any(part.peers is not None for part in parts) else None,
        train_data=combined.train_data if any(part.train_data is not None for part in parts) else None,
        capturable=all(getattr(part, "capturable", True) for part in parts),
    )


def combine_entries(entries: list[Entry]) -> Entry:
    """The registry entry of the combined method of ``entries``: its plugins, distributions and
    versions joined with ``+`` (each distinct one once)."""
    combined = combine_methods([entry.obj for entry in entries])
    dists = "+".join(dict.fromkeys(entry.dist for entry in entries))
    versions = "+".join(dict.fromkeys(entry.version for entry in entries))
    return Entry(combined, "+".join(entry.plugin for entry in entries), dists, versions)
