"""Per-layer diffs: each module that owns a diffed tensor computes theta + delta when it runs.

`DiffModel` attaches one `_Site` to every module of the wrapped model that directly owns a diffed
parameter (``module._parameters``, so a weight tied between two modules has two sites and one
diff). A forward pre-hook puts the effective tensor theta + delta in place of the parameter for the
duration of that module's forward, and a forward hook (``always_call``, so also after an
exception) puts the frozen parameter back. So:

* the effective weight of a layer exists from that layer's forward until its backward (autograd
  keeps it as that layer's saved tensor, exactly as long as the layer's own activations), never
  all layers' at once up front;
* with ``recompute=True`` it is not even kept that long: the tensors autograd saves that share the
  effective weight's storage are replaced by a note, and the weight is computed again, from the
  same gate noise, when that layer's backward needs it (one tensor's weight alive at a time);
* activation checkpointing (``model.gradient_checkpointing_enable()`` of transformers, or
  ``torch.utils.checkpoint`` around blocks) reruns the block's modules, so their hooks compute
  the same effective weights again from the step's noise seed: nothing outside the checkpointed
  block is needed;
* ``model.generate`` and direct calls of the wrapped model see theta + delta as well;
* in the candidate L0 stage an ``nn.Linear`` weight enters its layer outside autograd and gets its
  gradient at the candidate entries only, from a sampled matmul (`SampledWeightGrad`), so the dense
  weight gradient (as large as the matrix, of which 5% would be kept) is never formed; an
  ``nn.Embedding`` gets only the rows the batch looks up, and passes their gradient to the candidates
  in them (`SampledRowsGrad`): a (vocabulary, dim) effective weight and its dense gradient, 2 x 45 MiB
  a step for MiniLM's token embedding, are never formed;
* in the dense L0 stage (on the CPU) an ``nn.Embedding`` computes its gates at the looked-up rows only
  (`DiffModel.gated_rows`, `gates.GatedRows`), not over the whole (vocabulary, dim) tensor.

The step state (`Step`: the noise seed of this forward, which tensors already contributed their
L0 term, and in the candidate L0 stage the values of every tensor's candidates, computed in one pass
when the step starts) lives on the DiffModel; the gate arithmetic is `DiffModel.effective`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from .apply import position_dtype

# sampled_addmm on CSR: a stable op; the notice is not for our users
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


@dataclass
class Step:
    """One forward pass: the gate-noise seed (None: deterministic gates) and the L0 bookkeeping."""

    seed: int | None
    with_l0: bool = False
    l0: torch.Tensor | None = None
    penalised: set = field(default_factory=set)
    ran: set = field(default_factory=set)
    # the candidate L0 stage: every tensor's theta + delta at its candidates, computed in one pass when
    # the step starts (`DiffModel._candidate_bank`); the hooks, recomputes and checkpointed reruns read it
    bank: dict | None = None

    def add_l0(self, name: str, value: torch.Tensor) -> None:
        self.penalised.add(name)
        self.l0 = value if self.l0 is None else self.l0 + value


class _Site:
    """The hooks of one module: swap its diffed parameters for theta + delta while it runs."""

    def __init__(self, injector: "Injector", module: nn.Module, names: list[tuple[str, str]]):
        self.injector = injector
        self.names = names  # (attribute on the module, the DiffModel's name of the parameter)
        self.stack: list = []
        self.handles = [
            module.register_forward_pre_hook(self.pre),
            module.register_forward_hook(self.post, always_call=True),
        ]

    def pre(self, module: nn.Module, args):
        inj = self.injector
        if not inj.enabled:
            self.stack.append(None)
            return
        dm = inj.dm
        step = dm.current_step()
        saved, effs, sampled, rows, new_args = [], [], [], None, None
        attrs = {}  # module attributes changed for this call, restored after it
        for local, name in self.names:
            found = (dm.sampled_effective(name, step) if local == "weight" and type(module) is nn.Linear
                     and torch.is_grad_enabled() and inj.samples(module._parameters[local]) else None)
            looks_up = (local == "weight" and type(module) is nn.Embedding and torch.is_grad_enabled()
                        and inj.samples_rows(module) and args and isinstance(args[0], torch.Tensor))
            found_rows = dm.sampled_rows(name, step, args[0]) if looks_up else None
            dense_rows = dm.gated_rows(name, step, args[0]) if looks_up and found_rows is None else None
            if found is not None:
                eff, vals, cand, csr = found
                sampled.append((vals, cand, csr))
            elif found_rows is not None:
                # the module looks the batch up in the rows it uses (renumbered), outside autograd
                eff, vals, sel, row, col, distinct, inverse = found_rows
                # padding_idx only shapes the weight's gradient, which SampledRowsGrad makes here
                attrs["padding_idx"] = pad = module.padding_idx
                rows = (inverse, vals, sel, row, col, int(distinct.numel()), _row_of(distinct, pad))
                module.padding_idx = None
                new_args = (inverse, *args[1:])
            elif dense_rows is not None:
                # the rows with their graph: the embedding's own backward gives their gradient (none for
                # the padding row, renumbered)
                eff, distinct, inverse = dense_rows
                attrs["padding_idx"] = module.padding_idx
                module.padding_idx = _row_of(distinct, module.padding_idx)
                new_args = (inverse, *args[1:])
            else:
                eff = dm.effective(name, step)
            if found_rows is None and dense_rows is None:  # (looked-up rows are not saved for backward)
                effs.append((name, eff))
            step.ran.add(name)
            saved.append((local, module._parameters[local]))
            # Replacing the value keeps the parameter's place in `_parameters` (and so the order of
            # named_parameters()); a plain tensor there is what `module.weight` returns meanwhile.
            module._parameters[local] = eff
        ctx = None
        if inj.recompute and torch.is_grad_enabled() and not _outer_saved_tensor_hooks():
            ctx = _RecomputeSaved(dm, step, effs)
            ctx.__enter__()
        self.stack.append((saved, ctx, sampled, rows, attrs))
        return new_args

    def post(self, module: nn.Module, args, output):
        entry = self.stack.pop() if self.stack else None
        if entry is None:
            return None
        saved, ctx, sampled, rows, attrs = entry
        if ctx is not None:
            ctx.__exit__(None, None, None)
        for local, param in saved:
            module._parameters[local] = param
        for attr, value in attrs.items():
            setattr(module, attr, value)
        for vals, cand, (crow, col) in sampled:
            output = SampledWeightGrad.apply(output, args[0], vals, cand, crow, col)
        if rows is not None:
            output = SampledRowsGrad.apply(output, *rows)
        return output if sampled or rows is not None else None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class SampledWeightGrad(torch.autograd.Function):
    """The identity on a linear layer's output y = x W^T + b whose weight W = theta + delta entered the
    layer outside autograd, adding in backward the weight's gradient at the candidate entries only:
    dL/dW[i, j] = sum_t dy[t, i] x[t, j] for each candidate (i, j), by a sampled matmul
    (`torch.sparse.sampled_addmm`), passed to the candidates' values `vals`. The layer's own backward
    still gives dL/dx and the bias gradient; the dense dL/dW, as large as the matrix and then gathered
    at 5% of its entries, is never formed (at 5% on bert-base's FFN shape on one CPU core: 30 ms
    against 103 ms for the dense matmul)."""

    @staticmethod
    def forward(ctx, y, x, vals, cand, crow, col):
        ctx.save_for_backward(x, cand, crow, col)
        ctx.shape = (y.shape[-1], x.shape[-1])
        ctx.vals_dtype = vals.dtype
        return y.view_as(y)

    @staticmethod
    def backward(ctx, dy):
        x, cand, crow, col = ctx.saved_tensors
        g = sampled_weight_grad(dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1]), cand, ctx.shape, (crow, col))
        return dy, None, g.to(ctx.vals_dtype), None, None, None


class SampledRowsGrad(torch.autograd.Function):
    """The identity on an embedding's output y = E[ids] whose weight entered as the distinct rows the
    batch looks up (`DiffModel.sampled_rows`, outside autograd; `inverse`: each id's row among them),
    adding in backward the gradient of the candidates in those rows: the rows' gradient (sum of dy
    over each row's occurrences, none for the padding row `skip`, as nn.Embedding gives) read at each
    candidate's (row, col); every other candidate's gradient is 0, as in the dense gradient."""

    @staticmethod
    def forward(ctx, y, inverse, vals, sel, row, col, n_rows: int, skip: int | None):
        ctx.save_for_backward(inverse, sel, row, col)
        ctx.n_rows, ctx.skip, ctx.n_vals, ctx.vals_dtype = n_rows, skip, vals.numel(), vals.dtype
        return y.view_as(y)

    @staticmethod
    def backward(ctx, dy):
        inverse, sel, row, col = ctx.saved_tensors
        dim = dy.shape[-1]
        g_rows = dy.new_zeros(ctx.n_rows, dim).index_add_(0, inverse.reshape(-1), dy.reshape(-1, dim))
        if ctx.skip is not None:
            g_rows[ctx.skip] = 0
        g = torch.zeros(ctx.n_vals, dtype=ctx.vals_dtype, device=dy.device)
        g[sel] = g_rows[row, col].to(ctx.vals_dtype)
        return dy, None, g, None, None, None, None, None


def _row_of(distinct: torch.Tensor, idx: int | None) -> int | None:
    """Where id `idx` (a padding index) is among the sorted distinct ids a batch looks up; None if absent."""
    if idx is None:
        return None
    hit = (distinct == idx).nonzero()
    return int(hit[0, 0]) if hit.numel() else None


def candidates_in_rows(crow: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index of each candidate in `rows` among all of a matrix's candidates, its row's index in `rows`),
    for the candidates' CSR row pointer `crow` and sorted distinct `rows`: work in the number of rows
    and of their candidates, not of all candidates."""
    start = crow.index_select(0, rows).long()
    count = crow.index_select(0, rows + 1).long() - start
    local = torch.repeat_interleave(torch.arange(rows.numel(), device=rows.device), count)
    first = torch.cumsum(count, 0) - count  # each row's first slot in the output
    sel = torch.arange(local.numel(), device=rows.device) - first.index_select(0, local) + start.index_select(0, local)
    return sel, local


_DENSE_ONLY: set = set()  # (device type, dtype) where sampled_addmm is not implemented


def sampled_weight_grad(dy: torch.Tensor, x: torch.Tensor, cand: torch.Tensor, shape: tuple[int, int],
                        csr: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """(dy^T x) at the flat positions `cand` (sorted) of an (out, in) matrix, for dy (T, out), x (T, in);
    `csr`: the positions' (crow, col), when the caller keeps them (`csr_of`)."""
    x = x.to(dy.dtype)
    key = (dy.device.type, dy.dtype)
    if key not in _DENSE_ONLY:
        crow, col = csr if csr is not None else csr_of(cand, shape)
        mask = torch.sparse_csr_tensor(crow, col, torch.zeros(col.numel(), dtype=dy.dtype, device=dy.device),
                                       size=shape, check_invariants=False)
        try:
            return torch.sparse.sampled_addmm(mask, dy.t(), x, beta=0.0).values()
        except (RuntimeError, NotImplementedError):
            _DENSE_ONLY.add(key)
    return (dy.t() @ x).reshape(-1).index_select(0, cand)


def csr_of(cand: torch.Tensor, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(crow_indices, col_indices) of sorted flat positions in an (out, in) matrix: int32 when the
    matrix has fewer than 2^31 entries (4 bytes a candidate kept for the step instead of 8), else int64."""
    out_f, in_f = shape
    cand = cand.long()
    rows = torch.div(cand, in_f, rounding_mode="floor")
    crow = torch.zeros(out_f + 1, dtype=torch.int64, device=cand.device)
    crow[1:] = torch.bincount(rows, minlength=out_f).cumsum(0)
    dtype = position_dtype(out_f * in_f)
    return crow.to(dtype), (cand - rows * in_f).to(dtype)


class _RecomputeSaved(torch.autograd.graph.saved_tensors_hooks):
    """Saved tensors that are (views of) an effective weight become a note; unpacking recomputes."""

    def __init__(self, dm, step: Step, effs: list[tuple[str, torch.Tensor]]):
        ptrs = {}
        for name, eff in effs:
            try:
                ptrs[eff.untyped_storage().data_ptr()] = name
            except (RuntimeError, NotImplementedError):
                pass
        seed, bank = step.seed, step.bank

        def pack(t):
            try:
                name = ptrs.get(t.untyped_storage().data_ptr())
            except (RuntimeError, NotImplementedError):
                name = None
            if name is None:
                return t
            return (_NOTE, name, seed, tuple(t.shape), t.stride(), t.storage_offset())

        def unpack(x):
            if isinstance(x, tuple) and len(x) == 6 and x[0] is _NOTE:
                _, name, seed_, shape, stride, offset = x
                with torch.no_grad():
                    full = dm.effective(name, Step(seed=seed_, bank=bank), for_recompute=True)
                return full.as_strided(shape, stride, offset)
            return x

        super().__init__(pack, unpack)


_NOTE = object()


def _outer_saved_tensor_hooks() -> bool:
    """Whether saved-tensor hooks are active already (activation checkpointing): then those decide
    what is kept, the effective weights included, and `_RecomputeSaved` stays out of their way."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is not None and top(True) is not None


class Injector:
    """Every `_Site` of a DiffModel; `remove()` detaches them (merge_and_unload)."""

    def __init__(self, dm, model: nn.Module, diff_names: list[str]):
        self.dm = dm
        self.enabled = True
        self.recompute = False
        # candidate-restricted nn.Linear weights get their gradient from a sampled matmul
        # (`SampledWeightGrad`) when True; False: from the dense one, gathered (the reference the tests
        # compare to); None: sampled on the CPU, where it was measured faster, dense elsewhere (on a GPU
        # the dense matmul is not measured against cuSPARSE's sampled one yet)
        self.sampled_grad: bool | None = None
        wanted = set(diff_names)
        by_id = {id(p): n for n, p in model.named_parameters() if n in wanted}
        self.sites: list[_Site] = []
        self.owners: dict[str, list[str]] = {n: [] for n in diff_names}
        for mod_name, module in model.named_modules(remove_duplicate=True):
            names = [(local, by_id[id(p)]) for local, p in module._parameters.items()
                     if p is not None and id(p) in by_id]
            if names:
                self.sites.append(_Site(self, module, names))
                for local, n in names:
                    self.owners[n].append(f"{mod_name}.{local}" if mod_name else local)

    def samples(self, weight: torch.Tensor) -> bool:
        """Whether a candidate-restricted nn.Linear `weight` gets the sampled gradient (`sampled_grad`)."""
        return weight.device.type == "cpu" if self.sampled_grad is None else self.sampled_grad

    def samples_rows(self, module: nn.Module) -> bool:
        """Whether a candidate-restricted nn.Embedding looks up only the batch's rows (`SampledRowsGrad`):
        on every device unless `sampled_grad` is False (the dense reference); not with max_norm (which
        renormalises the weight in place) or scale_grad_by_freq."""
        return self.sampled_grad is not False and module.max_norm is None and not module.scale_grad_by_freq

    def remove(self) -> None:
        for site in self.sites:
            site.remove()
        self.sites = []
        self.enabled = False
