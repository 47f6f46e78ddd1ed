"""CUDA streams on the CPU, with a race check: what a step split over several streams (the teacher
branch, lockstep's members) may read and write, checked without a GPU.

:func:`fake_streams` replaces ``torch.cuda.Stream``, ``current_stream``, ``stream`` and
``synchronize`` with streams that queue nothing (every operator runs at once, as on the CPU) but
keep the order CUDA would guarantee between them: a vector clock per stream, advanced by each
operator launched on it and merged by ``wait_stream`` and by a host synchronisation. Streams are
non-blocking, as PyTorch's are: nothing orders two streams but those waits.

:class:`RaceCheck` (a ``TorchDispatchMode``) then looks at every operator: a tensor it reads must
have been written on the same stream, or on one whose write the reading stream has waited for;
a tensor it writes in place must not be read or written on another stream the writer has not
waited for. A freshly allocated output starts a history of its own (CUDA's caching allocator
hands a block to one stream only). Views move no data and are not operators here."""
from __future__ import annotations

import contextlib
import itertools

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class FakeStreams:
    """The streams of one test: the default one, and every ``torch.cuda.Stream`` made since."""

    def __init__(self):
        self.ids = itertools.count()
        self.all: list[FakeStream] = []
        self.host: dict[int, int] = {}  # what every stream has done by the last host synchronisation
        self.default = FakeStream(self)
        self.current = self.default

    def synchronize(self, device=None) -> None:
        for s in self.all:
            for k, v in s.clock.items():
                self.host[k] = max(self.host.get(k, 0), v)


class FakeStream:
    def __init__(self, streams: FakeStreams, device=None):
        self.streams, self.id = streams, next(streams.ids)
        self.clock: dict[int, int] = {self.id: 0}
        self.ops = 0  # operators launched on it
        streams.all.append(self)

    def wait_stream(self, other: FakeStream) -> None:
        for k, v in other.clock.items():
            self.clock[k] = max(self.clock.get(k, 0), v)

    def launch(self) -> int:
        """One operator on this stream: its time on the stream's own clock."""
        for k, v in self.streams.host.items():  # work launched after a host sync follows it
            self.clock[k] = max(self.clock.get(k, 0), v)
        self.clock[self.id] += 1
        self.ops += 1
        return self.clock[self.id]

    def after(self, stream_id: int, time: int) -> bool:
        """Does this stream's next operator run after ``time`` on stream ``stream_id``?"""
        return stream_id == self.id or self.clock.get(stream_id, 0) >= time


def fake_streams(monkeypatch) -> FakeStreams:
    streams = FakeStreams()

    @contextlib.contextmanager
    def stream(s):
        before, streams.current = streams.current, s
        try:
            yield
        finally:
            streams.current = before

    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None, **kw: FakeStream(streams, device))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: streams.current)
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torch.cuda, "synchronize", streams.synchronize)
    return streams


def _storage(t: torch.Tensor):
    if t.device.type == "meta" or t.untyped_storage().nbytes() == 0:
        return None
    return t.untyped_storage().data_ptr()


class RaceCheck(TorchDispatchMode):
    """Every operator run inside it is checked against the streams' order; ``races`` lists the
    ones that read or wrote a tensor another stream had not finished with."""

    def __init__(self, streams: FakeStreams):
        super().__init__()
        self.streams = streams
        self.writes: dict[int, tuple[int, int]] = {}  # storage -> (stream, time) of its last write
        self.reads: dict[int, dict[int, int]] = {}  # storage -> {stream: time of its last read}
        self.races: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        schema = func._schema
        if any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns):
            return out  # a view
        s = self.streams.current
        now = s.launch()
        given = dict(zip((a.name for a in schema.arguments), args)) | kwargs
        written = {key for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write
                   for t in tree_leaves(given.get(a.name)) if isinstance(t, torch.Tensor)
                   and (key := _storage(t)) is not None}
        for t in tree_leaves((args, kwargs)):
            if not isinstance(t, torch.Tensor) or (key := _storage(t)) is None:
                continue
            if key in self.writes and not s.after(*self.writes[key]):
                self.races.append(f"{func}: reads on stream {s.id} what stream {self.writes[key][0]} wrote")
            if key in written:
                for other, time in self.reads.get(key, {}).items():
                    if not s.after(other, time):
                        self.races.append(f"{func}: writes on stream {s.id} what stream {other} still reads")
            else:
                self.reads.setdefault(key, {})[s.id] = now
        for key in written:
            self.writes[key] = (s.id, now)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and (key := _storage(t)) is not None and key not in written:
                self.writes[key], self.reads[key] = (s.id, now), {}  # fresh memory, this stream's
        return out
