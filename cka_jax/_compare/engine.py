"""Feeding minibatches to the accumulator: one at a time, or k at a time over k devices.

With several devices, payloads of one shape are buffered until there is one per device; their
activations are computed as one sharded (k, batch, ...) array and added by
`MinibatchCKA.update_sharded` (equal to k calls of `update`, bootstrap weights included). A
payload of another shape (the short last batch) and what is left in the buffer at the end go
through `update`, in order. After every update the engine keeps, without waiting for the device,
which layers' sums are still finite; `nonfinite` reads them at the end to name the layer and the
first batch with NaN or inf activations.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh

from cka_jax._compare.full import WholeSetCKA
from cka_jax._minibatch import MinibatchCKA

FLAG_BATCHES = 64  # finiteness flags kept on the device before they are read


def resolve_devices(devices) -> list:
    """None: every local device; an int k: the first k; a sequence of jax devices as given."""
    local = jax.local_devices()
    if devices is None:
        return local
    if isinstance(devices, (int, np.integer)) and not isinstance(devices, bool):
        if not 1 <= devices <= len(local):
            raise ValueError(f"devices={devices} but there are {len(local)} local devices; pass 1..{len(local)}")
        return local[:devices]
    if isinstance(devices, Sequence) and devices and all(isinstance(d, jax.Device) for d in devices):
        return list(devices)
    raise ValueError(f"devices must be None, a device count or a list of jax devices, got {devices!r}")


def _finite(acc) -> tuple[Any, Any]:
    if isinstance(acc, WholeSetCKA):
        return acc.finite[0].copy(), acc.finite[-1].copy()
    return jnp.isfinite(acc.xx), jnp.isfinite(acc.yy)


class Engine:
    """Runs the updates of `source` on `acc` (MinibatchCKA or WholeSetCKA)."""

    def __init__(self, acc, source, devices: list):
        self.acc, self.source = acc, source
        self.sharded = len(devices) > 1 and isinstance(acc, MinibatchCKA)
        self.k = len(devices)
        self.buffer: list[tuple[int, Any]] = []
        self.flags: list[tuple[int, int, Any, Any]] = []
        self.first_bad: list[dict[tuple[int, int], tuple[int, int]]] = [{}, {}]
        if self.sharded:
            self.mesh = Mesh(np.array(devices), ("batch",), axis_types=(AxisType.Auto,))

    def add(self, index: int, payload) -> None:
        if not self.sharded:
            self._serial(index, payload)
            return
        if self.buffer and self.source.stack_key(self.buffer[0][1]) != self.source.stack_key(payload):
            self._drain()
        self.buffer.append((index, payload))
        if len(self.buffer) == self.k:
            acts_a, acts_b = self.source.stacked([p for _, p in self.buffer], self.mesh)
            self.acc = self.acc.update_sharded(acts_a, acts_b, mesh=self.mesh)
            self._record(self.buffer[0][0], self.buffer[-1][0])
            self.buffer = []

    def _serial(self, index: int, payload) -> None:
        acts_a, acts_b = self.source.acts(payload)
        self.acc = self.acc.update(acts_a, acts_b)
        self._record(index, index)

    def _drain(self) -> None:
        for index, payload in self.buffer:
            self._serial(index, payload)
        self.buffer = []

    def _record(self, first: int, last: int) -> None:
        """Notes which sums are finite after batches first..last (device arrays: no wait); reads
        them every FLAG_BATCHES updates so a long stream keeps no more than that."""
        self.flags.append((first, last, *_finite(self.acc)))
        if len(self.flags) >= FLAG_BATCHES:
            self._read_flags()

    def _read_flags(self) -> None:
        for first, last, *finite in jax.device_get(self.flags):
            for side in (0, 1):
                for model, layer in zip(*np.nonzero(~np.asarray(finite[side])), strict=True):
                    self.first_bad[side].setdefault((int(model), int(layer)), (first, last))
        self.flags = []

    def finish(self):
        self._drain()
        return self.acc

    def nonfinite(self) -> list[dict[tuple[int, int], tuple[int, int]]]:
        """Per side: (model, layer) -> the batches (first, last) of the update after which its sums
        stopped being finite (a NaN or inf activation in one of them; sums never recover)."""
        self._read_flags()
        return self.first_bad
