"""The one face a scheme sees for a hop of model blocks: ``send``, ``post``, ``receive`` (and
``cancel``, ``free``), in MPI's own words.

Each hop goes by one of two paths, chosen here and nowhere else: a **hop plan** (the ring's
repeating hops: persistent requests made once over the model's own host block buffers,
``Communicator.hop_plan``), or the **general path** (``Communicator.send_blocks`` / ``post`` /
``recv_blocks``, with ``payloads.HopBuffers`` packing and landing the payload). Both speak the
same wire and count the same bytes, so either end may take either path. No MPI here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from snake_mpi.blocks import BlockModel, block_nbytes
from snake_mpi.transport.protocol import Communicator, HopPlan
from snake_mpi.transport.wire import Transfer, TransferSpec

MAX_PLANS = 64
"""Hop plans kept per rank (a ring hop needs one or two; delta transfers a few more)."""

Key = tuple[int, int, int, int]
"""A posted receive: (source, kind, round, hop)."""


class Buffers(Protocol):
    """What ``Hops`` uses of a transfer path's buffers (``payloads.HopBuffers``)."""

    def pack(self, model: BlockModel, ids: Sequence[int]) -> tuple[Any, np.ndarray]: ...

    def unpack(self, model: BlockModel, ids: Sequence[int], payload: Any, sizes: Any) -> None: ...

    def into(self, model: BlockModel) -> Any: ...

    @property
    def alloc(self) -> Callable[[int], Any] | None: ...

    def host_in_place(self, model: BlockModel) -> bool: ...

    def host_views(self, model: BlockModel, ids: Sequence[int], *, receive: bool) -> list[Any]: ...


class Hops:
    """Hops of a model's blocks between this rank and its peers over ``comm``, in the buffers
    of ``buffers``' transfer path; keeps the hop plans it made and the receives it posted."""

    def __init__(self, comm: Communicator, buffers: Buffers, *, plans: bool = True) -> None:
        self.comm = comm
        self.buffers = buffers
        self.plans = plans
        """Whether hops in place on the host go by hop plans (False: the general path every
        hop, to compare)."""
        self._plans: dict[tuple[int, int, tuple[int, ...]], tuple[int, HopPlan]] = {}
        """(id of the model, peer, block ids) -> (the model's ``layout_gen`` then, plan)."""
        self._posted: dict[Key, HopPlan] = {}

    def send(
        self, model: BlockModel, dest: int, kind: int, round_: int, hop: int, ids: Sequence[int]
    ) -> float:
        """Send blocks ``ids`` of ``model`` (state and versions) to ``dest`` as transfer
        ``(kind, round_, hop)``; returns the seconds spent packing them (0.0 by a plan: the
        block buffers go as they are)."""
        ids = list(ids)
        plan = self._plan(model, dest, ids)
        if plan is not None:
            plan.send(kind, round_, hop, model.versions[ids].tolist())
            return 0.0
        t0 = time.perf_counter()
        payload, sizes = self.buffers.pack(model, ids)
        pack_s = time.perf_counter() - t0
        self.comm.send_blocks(
            dest,
            Transfer(
                kind=kind,
                round=round_,
                hop=hop,
                block_ids=np.asarray(ids, dtype=np.int64),
                versions=model.versions[ids],
                block_nbytes=sizes,
                payload=payload,
            ),
        )
        return pack_s

    def post(
        self,
        model: BlockModel,
        source: int,
        kind: int,
        round_: int,
        hop: int,
        ids: Sequence[int],
        *,
        into_model: bool = True,
    ) -> None:
        """Post the receive of transfer ``(kind, round_, hop)`` of blocks ``ids`` from
        ``source`` now, completed by a later ``receive`` of it. ``into_model``: the blocks land
        in ``model``'s own block buffers where its hops are in place (then they must stay
        held until the receive), else in a transfer buffer.

        So a hop's bytes land while this rank still works, and a rank that enters a
        collective before its next receive posts that receive first (see ``Comm.post``)."""
        ids = [int(b) for b in ids]
        plan = self._plan(model, source, ids, receive=True) if into_model else None
        if plan is not None:
            plan.post(kind, round_, hop)
            self._posted[(source, kind, round_, hop)] = plan
            return
        blocks = tuple((b, block_nbytes(model, b)) for b in ids)
        into = self.buffers.into(model) if into_model else None
        spec = TransferSpec(kind, round_, hop, blocks=blocks, alloc=self.buffers.alloc, into=into)
        self.comm.post(source, spec)

    def receive(
        self, model: BlockModel, source: int, kind: int, round_: int, hop: int
    ) -> tuple[list[int], float]:
        """Receive transfer ``(kind, round_, hop)`` from ``source`` into ``model`` (state and
        versions); returns the block ids and the seconds spent copying the payload into the
        model (0.0 where it landed there). Block ids out of range, or older versions than
        this rank holds, end the job (``ValueError``; where the bytes land in the model's own
        buffers they are there already)."""
        t = self._take(model, source, kind, round_, hop, into_model=True)
        ids = t.block_ids.tolist()
        held = model.versions[ids].tolist()
        stale = [b for b, v, h in zip(ids, t.versions.tolist(), held, strict=True) if v < h]
        if stale:
            raise ValueError(
                f"rank {self.comm.rank}: received older versions of blocks {stale} than it "
                f"holds (round {round_}, hop {hop} from rank {source})"
            )
        unpack_s = 0.0
        if not isinstance(t.payload, list):  # else it landed in the blocks: nothing to copy
            t0 = time.perf_counter()
            self.buffers.unpack(model, ids, t.payload, t.block_nbytes)
            unpack_s = time.perf_counter() - t0
        model.versions[ids] = t.versions
        return ids, unpack_s

    def receive_transfer(
        self, model: BlockModel, source: int, kind: int, round_: int, hop: int
    ) -> Transfer:
        """Receive transfer ``(kind, round_, hop)`` of ``model``'s blocks from ``source`` into
        a transfer buffer (``model`` is left as it is: e.g. a client's update to average);
        block ids out of range end the job (``ValueError``)."""
        return self._take(model, source, kind, round_, hop, into_model=False)

    def _take(
        self,
        model: BlockModel,
        source: int,
        kind: int,
        round_: int,
        hop: int,
        *,
        into_model: bool,
    ) -> Transfer:
        """The transfer, by the plan that posted it, else by the general path."""
        plan = self._posted.pop((source, kind, round_, hop), None)
        if plan is not None:
            versions = plan.receive(kind, round_, hop)
            return Transfer(
                kind,
                round_,
                hop,
                np.array(plan.ids, dtype=np.int64),
                np.array(versions, dtype=np.int64),
                np.array(plan.sizes, dtype=np.int64),
                plan.bufs,
            )
        into = self.buffers.into(model) if into_model else None
        spec = TransferSpec(kind, round_, hop, alloc=self.buffers.alloc, into=into)
        t = self.comm.recv_blocks(source, spec)
        n = model.n_blocks
        if any(b < 0 or b >= n for b in t.block_ids.tolist()):
            raise ValueError(
                f"rank {self.comm.rank}: block ids {t.block_ids.tolist()} out of range "
                f"(model has {n})"
            )
        return t

    def cancel(self) -> None:
        """Cancel every receive posted and not received: its transfer will not come (the run
        stops at a checkpoint)."""
        while self._posted:
            _, plan = self._posted.popitem()
            plan.cancel()
        self.comm.cancel()

    def free(self) -> None:
        """Free every hop plan (the hops are over; a posted receive is cancelled)."""
        for _, plan in self._plans.values():
            plan.free()
        self._plans.clear()
        self._posted.clear()

    def _plan(
        self, model: BlockModel, peer: int, ids: list[int], *, receive: bool = False
    ) -> HopPlan | None:
        """The plan for hops of blocks ``ids`` of ``model`` with ``peer`` in their own host
        block buffers, made on first use and kept while the model's buffers stay
        (``BlockModel.layout_gen``). ``receive``: a released block gets its bytes back first
        (it is about to be received); to send one is an error (as in ``HopBuffers.pack``).
        None where the general path serves: plans off, not in place on the host path, a plan
        of these blocks posted and not yet received, or none from the communicator."""
        if not (self.plans and self.buffers.host_in_place(model)):
            return None
        key = (id(model), peer, tuple(ids))
        kept = self._plans.get(key)
        if kept is not None:
            if kept[1].active:  # its receive is posted: not to be started or freed now
                return None
            if kept[0] == model.layout_gen:
                return kept[1]
        plan = self.comm.hop_plan(peer, ids, self.buffers.host_views(model, ids, receive=receive))
        if kept is not None:
            kept[1].free()
            del self._plans[key]
        if plan is not None:
            self._drop_stale(model.layout_gen)
            self._plans[key] = (model.layout_gen, plan)
        return plan

    def _drop_stale(self, gen: int) -> None:
        """Free plans made over buffers the model no longer has (not posted ones), and the
        oldest beyond ``MAX_PLANS``."""
        for key, (g, plan) in list(self._plans.items()):
            if not plan.active and (g != gen or len(self._plans) >= MAX_PLANS):
                plan.free()
                del self._plans[key]
