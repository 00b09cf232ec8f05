"""Find the transformer structure in an ATen graph: blocks, attention, MLPs, norms, residuals.

Found from the ops, not from module names (those are only labels for people):

- a *linear* is `aten.linear` (or GPT-2's `view -> addmm(bias, x, W[in, out]) -> view`);
- an *attention core* is `aten.scaled_dot_product_attention` (or `trimformer::local_attention`, put
  there by the sparse-attention pass), or matmul -> softmax -> matmul;
  its q/k/v projections are the linears reached walking back from its operands through shape,
  rotary and GQA-repeat ops (a fused projection is a linear followed by `split` + `getitem`), and
  its o-projection is the first linear reached walking forward through shape ops;
- a *residual add* is an `aten.add.Tensor` reached from a branch's last linear through shape ops
  and dropout; its other operand is the residual input;
- an *MLP* is a residual branch whose last linear ("down") is fed, through elementwise ops
  (activation, gating), by one or two linears ("up", "gate") that read the same input;
- a *norm* is `aten.layer_norm` or the RMSNorm pattern `w * (x * rsqrt(mean(x^2) + eps))`.
  Pre-norm: the branch reads norm(residual input). Post-norm: the add's only consumer is a norm,
  and that norm is the next residual input (BERT).
- a *block* is an attention sub-layer followed by an MLP sub-layer (a pair of residual adds).

Anything that does not fit is reported in `Structure.unmatched` and left untouched.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import fx

from trimformer.graph import ops
from trimformer.graph.rewrite import args_of, is_op, module_path, param_target, tensor_meta

Node = fx.Node


@dataclass(frozen=True)
class Linear:
    node: Node  # the linear or addmm node
    input: Node  # the (B, S, in) tensor it reads
    output: Node  # the (B, S, out) tensor it produces (the view after addmm)
    weight: str  # parameter target
    bias: str | None
    transposed: bool  # weight stored [in, out] (GPT-2 Conv1D)
    in_features: int
    out_features: int

    @property
    def name(self) -> str:
        return module_path(self.node) or self.node.name


@dataclass(frozen=True)
class Projection:
    """A linear, or a slice [start, start+size) of a fused linear's output features."""

    linear: Linear
    start: int
    size: int

    @property
    def fused(self) -> bool:
        return self.size != self.linear.out_features


@dataclass(frozen=True)
class Norm:
    kind: Literal["layer_norm", "rms_norm"]
    input: Node
    output: Node
    weight: str | None
    bias: str | None
    eps: float


@dataclass(frozen=True)
class Attention:
    core: Node  # the SDPA (or local attention) node, or the final matmul of an eager core
    form: Literal["sdpa", "local", "eager"]
    q: Projection
    k: Projection
    v: Projection
    o: Linear
    num_heads: int
    num_kv_heads: int
    head_dim: int
    causal: bool


@dataclass(frozen=True)
class MLP:
    up: Linear
    gate: Linear | None
    down: Linear
    activation: str


@dataclass(frozen=True)
class SubLayer:
    kind: Literal["attention", "mlp"]
    site: Attention | MLP
    add: Node  # the residual add
    residual: Node  # the residual input of the add
    branch_input: Node  # what the branch reads (norm output for pre-norm)
    pre_norm: Norm | None
    post_norm: Norm | None

    @property
    def output(self) -> Node:
        """The hidden state after this sub-layer (after its norm, for post-norm models)."""
        return self.post_norm.output if self.post_norm is not None else self.add

    @property
    def name(self) -> str:
        lin = self.site.o if isinstance(self.site, Attention) else self.site.down
        path = module_path(lin.node)
        return path.rsplit(".", 2)[0] if path.count(".") >= 2 else path


@dataclass(frozen=True)
class Block:
    """A pair of residual sub-layers; either may be absent once a pass dropped it."""

    index: int
    attention: SubLayer | None
    mlp: SubLayer | None

    @property
    def sublayers(self) -> tuple[SubLayer, ...]:
        return tuple(s for s in (self.attention, self.mlp) if s is not None)

    @property
    def input(self) -> Node:
        return self.sublayers[0].residual

    @property
    def output(self) -> Node:
        return self.sublayers[-1].output

    @property
    def name(self) -> str:
        names = [s.name for s in self.sublayers]
        if len(names) == 1:
            return names[0]
        common = []
        for x, y in zip(names[0].split("."), names[1].split("."), strict=False):
            if x != y:
                break
            common.append(x)
        return ".".join(common) or f"block {self.index}"


@dataclass(frozen=True)
class Structure:
    blocks: tuple[Block, ...]
    norm_style: Literal["pre-norm", "post-norm", "none", "mixed"]
    unmatched: tuple[str, ...] = field(default=())
    hidden_size: int = 0

    def sublayers(self) -> list[SubLayer]:
        return [s for b in self.blocks for s in b.sublayers]

    def block(self, index: int) -> Block | None:
        """The block with this index (indices are those of the first discovery; may have gaps)."""
        return next((b for b in self.blocks if b.index == index), None)

    def summary(self) -> dict[str, object]:
        """JSON-ready description for reports and `trimformer inspect`."""
        rows = []
        for b in self.blocks:
            rows.append({"index": b.index, "name": b.name, **_block_sites(b)})
        return {
            "blocks": rows,
            "num_blocks": len(self.blocks),
            "norm_style": self.norm_style,
            "hidden_size": self.hidden_size,
            "unmatched": list(self.unmatched),
        }


def _block_sites(b: Block) -> dict[str, object]:
    out: dict[str, object] = {"attention": None, "mlp": None}
    if b.attention is not None:
        a: Attention = b.attention.site  # type: ignore[assignment]
        out["attention"] = {
            "form": a.form,
            "heads": a.num_heads,
            "kv_heads": a.num_kv_heads,
            "head_dim": a.head_dim,
            "causal": a.causal,
            "qkv": "fused" if a.q.fused else "separate",
            "q": a.q.linear.name,
            "k": a.k.linear.name,
            "v": a.v.linear.name,
            "o": a.o.name,
            "norm": _norm_kind(b.attention),
        }
    if b.mlp is not None:
        m: MLP = b.mlp.site  # type: ignore[assignment]
        out["mlp"] = {
            "up": m.up.name,
            "gate": m.gate.name if m.gate else None,
            "down": m.down.name,
            "activation": m.activation,
            "width": m.down.in_features,
            "norm": _norm_kind(b.mlp),
        }
    return out


def _norm_kind(s: SubLayer) -> str:
    n = s.pre_norm or s.post_norm
    where = "pre" if s.pre_norm else ("post" if s.post_norm else "none")
    return f"{where}:{n.kind}" if n else "none"


# ----------------------------------------------------------------------------- linears


def find_linears(gm: fx.GraphModule) -> dict[Node, Linear]:
    """Every linear in the graph, keyed by its output node (and by its op node)."""
    found: dict[Node, Linear] = {}
    for n in gm.graph.nodes:
        lin = _match_linear(n)
        if lin is not None:
            found[lin.output] = lin
            found[lin.node] = lin
    return found


def _match_linear(n: Node) -> Linear | None:
    if is_op(n, ops.LINEAR):
        a = args_of(n)
        w = param_target(a["weight"])
        wv = tensor_meta(a["weight"])
        if w is None or wv is None or wv.dim() != 2:
            return None
        b = a.get("bias")
        return Linear(n, a["input"], n, w, param_target(b), False, wv.shape[1], wv.shape[0])
    if is_op(n, ops.ADDMM):
        a = args_of(n)
        w = param_target(a["mat2"])
        wv = tensor_meta(a["mat2"])
        if w is None or wv is None:
            return None
        inp = a["mat1"]
        src = args_of(inp)["self"] if is_op(inp, {torch.ops.aten.view.default}) else inp
        users = list(n.users)
        out = users[0] if (len(users) == 1 and is_op(users[0], ops.SHAPE)) else n
        return Linear(n, src, out, w, param_target(a["self"]), True, wv.shape[0], wv.shape[1])
    return None


# ----------------------------------------------------------------------------- norms


def match_norm(n: Node) -> Norm | None:
    """`n` is the output of a LayerNorm or of the RMSNorm pattern."""
    if is_op(n, ops.LAYER_NORM):
        a = args_of(n)
        return Norm(
            "layer_norm",
            a["input"],
            n,
            param_target(a.get("weight")),
            param_target(a.get("bias")),
            float(a.get("eps", 1e-5)),
        )
    return _match_rms_norm(n)


def _strip_casts(n: object) -> object:
    while is_op(n, {torch.ops.aten.to.dtype, torch.ops.aten._to_copy.default}):
        n = args_of(n)["self"]  # type: ignore[arg-type]
    return n


def _match_rms_norm(n: Node) -> Norm | None:
    # out = weight * cast(x * rsqrt(mean(x^2, -1) + eps))  (weight optional)
    weight = None
    core: object = n
    if is_op(n, ops.MUL):
        a = args_of(n)
        for w, other in ((a["self"], a["other"]), (a["other"], a["self"])):
            if param_target(w) is not None:
                weight, core = param_target(w), _strip_casts(other)
                break
    if not is_op(core, ops.MUL):
        return None
    a = args_of(core)  # type: ignore[arg-type]
    for x, r in ((a["self"], a["other"]), (a["other"], a["self"])):
        if not is_op(r, ops.RMS_RSQRT):
            continue
        s = args_of(r)["self"]
        eps = 0.0
        if is_op(s, {torch.ops.aten.add.Scalar, torch.ops.aten.add.Tensor}):
            sa = args_of(s)
            if isinstance(sa["other"], (int, float)):
                eps, s = float(sa["other"]), sa["self"]
        if not is_op(s, ops.RMS_MEAN):
            continue
        p = args_of(s)["self"]
        if is_op(p, ops.RMS_POW) and args_of(p)["self"] is x and args_of(p)["exponent"] == 2:
            return Norm("rms_norm", _strip_casts(x), n, weight, None, eps)  # type: ignore[arg-type]
    return None


# ----------------------------------------------------------------------------- walks

_STOP = ops.LINEAR | ops.ADDMM | ops.SDPA | ops.LOCAL_ATTENTION | ops.LAYER_NORM | ops.EMBEDDING


def _producers(start: Node, linears: dict[Node, Linear], through: set) -> dict[Linear, Node]:
    """Linears reached walking back from `start` through `through` ops; value = node reached."""
    found: dict[Linear, Node] = {}
    seen: set[Node] = set()
    todo = deque([start])
    while todo:
        n = todo.popleft()
        if n in seen:
            continue
        seen.add(n)
        if n in linears:
            found[linears[n]] = n
            continue
        if (n.op != "call_function") or (n.target in _STOP):
            continue
        if (n.target in through) or (n.target in ops.GETITEM) or (n.target in ops.SPLIT):
            todo.extend(n.all_input_nodes)
    return found


def _forward_to(start: Node, targets: set, through: set) -> Node | None:
    """Follow single-user chains from `start` through `through` ops to a node in `targets`."""
    n = start
    for _ in range(16):
        users = list(n.users)
        if len(users) != 1:
            return None
        n = users[0]
        if is_op(n, targets):
            return n
        if not is_op(n, through):
            return None
    return None


def _qkv_projection(operand: Node, linears: dict[Node, Linear]) -> Projection | None:
    through = ops.SHAPE | ops.ELEMENTWISE
    found = _producers(operand, linears, through)
    if len(found) != 1:
        return None
    lin = next(iter(found))
    # Fused projection: find the getitem on the path from the operand back to the split.
    idx, sizes = _getitem_on_path(operand, lin)
    if idx is None:
        return Projection(lin, 0, lin.out_features)
    if isinstance(sizes, int):
        sizes = [sizes] * (lin.out_features // sizes)
    start = sum(sizes[:idx])
    return Projection(lin, start, sizes[idx])


def _getitem_on_path(start: Node, lin: Linear) -> tuple[int | None, object]:
    seen: set[Node] = set()
    todo = deque([start])
    while todo:
        n = todo.popleft()
        if n in seen or n is lin.node:
            continue
        seen.add(n)
        if is_op(n, ops.GETITEM) and is_op(n.args[0], ops.SPLIT):
            a = args_of(n.args[0])
            return int(n.args[1]), a.get("split_size", a.get("split_sizes"))
        if n.op == "call_function" and n.target not in _STOP:
            todo.extend(n.all_input_nodes)
    return None, None


def _is_causal(core: Node, mask: object) -> bool:
    if args_of(core).get("is_causal"):
        return True
    if not isinstance(mask, Node):
        return False
    # A causal mask compares two position ranges (q_idx >= kv_idx) somewhere in its construction.
    seen: set[Node] = set()
    todo = deque([mask])
    while todo:
        n = todo.popleft()
        if n in seen:
            continue
        seen.add(n)
        if is_op(n, ops.COMPARE):
            return True
        todo.extend(n.all_input_nodes)
    return False


# ----------------------------------------------------------------------------- attention


def _attention_cores(gm: fx.GraphModule) -> list[tuple[Node, str, Node, Node, Node, object]]:
    """(core, form, q, k, v, mask) for SDPA nodes and matmul -> softmax -> matmul chains."""
    cores = []
    for n in gm.graph.nodes:
        if is_op(n, ops.SDPA | ops.LOCAL_ATTENTION):
            a = args_of(n)
            form = "local" if is_op(n, ops.LOCAL_ATTENTION) else "sdpa"
            cores.append((n, form, a["query"], a["key"], a["value"], a.get("attn_mask")))
        elif is_op(n, ops.SOFTMAX):
            # softmax(scale * q @ k^T + mask) @ v
            pv = _forward_to(n, ops.MATMUL, ops.SHAPE | ops.DROPOUT)
            if pv is None:
                continue
            s = args_of(n)["self"]
            mask = None
            qk = None
            for _ in range(6):
                if is_op(s, ops.MATMUL):
                    qk = s
                    break
                if not isinstance(s, Node) or s.op != "call_function":
                    break
                a = args_of(s)
                tensor_args = [x for x in a.values() if isinstance(x, Node)]
                if is_op(s, ops.ADD) and len(tensor_args) == 2:
                    mask = a["other"]
                    s = a["self"]
                elif tensor_args:
                    s = tensor_args[0]
                else:
                    break
            if qk is None:
                continue
            qa = args_of(qk)
            k_t = qa.get("other", qa.get("mat2"))
            pa = args_of(pv)
            cores.append((pv, "eager", qa["self"], k_t, pa.get("other", pa.get("mat2")), mask))
    return cores


def _match_attention(
    core: Node, form: str, q: Node, k: Node, v: Node, mask: object, linears: dict[Node, Linear]
) -> Attention | str:
    qp = _qkv_projection(q, linears)
    kp = _qkv_projection(k, linears)
    vp = _qkv_projection(v, linears)
    if qp is None or kp is None or vp is None:
        return f"attention core {core.name} ({module_path(core)}): q/k/v projections not found"
    o_node = _forward_to(core, ops.LINEAR | ops.ADDMM, ops.SHAPE)
    if o_node is None and is_op(core, ops.MATMUL):
        o_node = _forward_to(core, ops.LINEAR | ops.ADDMM, ops.SHAPE)
    if o_node is None or o_node not in linears:
        return f"attention core {core.name} ({module_path(core)}): no output projection"
    qv = tensor_meta(q)
    vv = tensor_meta(v)
    if qv is None or qv.dim() != 4 or vv is None:
        return f"attention core {core.name}: query is not (batch, heads, seq, head_dim)"
    heads = int(qv.shape[1])
    head_dim = int(qv.shape[3])
    kv_heads = vp.size // int(vv.shape[3])
    return Attention(
        core=core,
        form=form,  # type: ignore[arg-type]
        q=qp,
        k=kp,
        v=vp,
        o=linears[o_node],
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        causal=_is_causal(core, mask),
    )


# ----------------------------------------------------------------------------- residuals


def _residual_add(lin: Linear) -> tuple[Node, Node] | None:
    """(add, residual input) if the linear's output flows into a residual add."""
    add = lin.output if is_op(lin.output, ops.ADD) else None
    add = add or _forward_to(lin.output, ops.ADD, ops.SHAPE | ops.DROPOUT)
    if add is None:
        return None
    a = args_of(add)
    x, y = a["self"], a["other"]
    if not (isinstance(x, Node) and isinstance(y, Node)):
        return None
    branch_side = x if _reaches(x, lin.output) else y
    residual = y if branch_side is x else x
    rv, bv = tensor_meta(residual), tensor_meta(branch_side)
    if rv is None or bv is None or rv.shape != bv.shape:
        return None
    return add, residual


def _reaches(n: Node, target: Node, limit: int = 8) -> bool:
    for _ in range(limit):
        if n is target:
            return True
        if not isinstance(n, Node) or not n.all_input_nodes:
            return False
        n = n.all_input_nodes[0]
    return n is target


def _norm_before(branch_input: Node, residual: Node) -> Norm | None:
    norm = match_norm(branch_input)
    if norm is not None and _strip_casts(norm.input) is _strip_casts(residual):
        return norm
    return None


def _norm_after(add: Node) -> Norm | None:
    users = list(add.users)
    if len(users) == 1:
        return match_norm(users[0])
    return None


def _mlp_from_down(down: Linear, linears: dict[Node, Linear]) -> MLP | None:
    through = ops.SHAPE | ops.ELEMENTWISE
    found = _producers(down.input, linears, through)
    if not found or len(found) > 2:
        return None
    ins = {lin.input for lin in found}
    if len(ins) != 1:
        return None
    acts = _activations_between(down.input, set(found))
    if len(found) == 1:
        up = next(iter(found))
        return MLP(up=up, gate=None, down=down, activation=acts.get(up, "unknown"))
    a, b = list(found)
    # The gate is the projection that passes through the activation (SwiGLU: silu(gate) * up).
    gate, up = (a, b) if (a in acts) and (b not in acts) else (b, a)
    if (gate not in acts) or (up in acts):
        return None
    return MLP(up=up, gate=gate, down=down, activation=acts[gate])


def _activations_between(start: Node, lins: set[Linear]) -> dict[Linear, str]:
    """For each linear feeding `start`, the activation op on its path (or a GELU decomposition)."""
    out: dict[Linear, str] = {}
    for lin in lins:
        seen: set[Node] = set()
        todo = deque([start])
        kinds: set[str] = set()
        while todo:
            n = todo.popleft()
            if n in seen or n is lin.output:
                continue
            seen.add(n)
            if n.op != "call_function" or n.target in _STOP:
                continue
            if _reaches_node(n, lin.output):
                if n.target in ops.ACTIVATIONS:
                    kinds.add(ops.ACTIVATIONS[n.target])
                todo.extend(n.all_input_nodes)
        if "tanh" in kinds:
            out[lin] = "gelu_tanh"  # 0.5 x (1 + tanh(...)) as GPT-2 writes it
        elif kinds:
            out[lin] = sorted(kinds)[0]
    return out


def _reaches_node(n: Node, target: Node) -> bool:
    seen: set[Node] = set()
    todo = deque([n])
    while todo:
        m = todo.popleft()
        if m is target:
            return True
        if m in seen or m.op != "call_function" or m.target in _STOP:
            continue
        seen.add(m)
        todo.extend(m.all_input_nodes)
    return False


# ----------------------------------------------------------------------------- discovery


TAG = "trimformer"  # node.meta key for provenance written by trimformer


def _block_tag(s: SubLayer) -> int | None:
    return s.add.meta.get(TAG, {}).get("block")


def _tagged_blocks(subs: list[SubLayer]) -> list[Block] | None:
    """Blocks as first found, from the tags on the residual adds (None if any is untagged).

    The first discovery numbers the blocks and tags each residual add with its block index, so
    later discoveries keep the same indices and pairings after passes remove sub-layers (the
    original pairing is ambiguous once, say, MLP 0 and attention 1 are both gone).
    """
    tags = [_block_tag(s) for s in subs]
    if not subs or any(t is None for t in tags):
        return None
    grouped: dict[int, dict[str, SubLayer]] = {}
    for t, s in zip(tags, subs, strict=True):
        if s.kind in grouped.setdefault(t, {}):  # type: ignore[arg-type]
            return None  # two attention sub-layers with one tag: not our tagging, re-pair
        grouped[t][s.kind] = s  # type: ignore[index]
    return [Block(i, g.get("attention"), g.get("mlp")) for i, g in grouped.items()]


def _pair_blocks(subs: list[SubLayer]) -> list[Block]:
    """Pair each attention sub-layer with the MLP that reads its output; tag the pairs."""
    blocks: list[Block] = []
    i = 0
    while i < len(subs):
        s = subs[i]
        nxt = subs[i + 1] if i + 1 < len(subs) else None
        if (
            (s.kind == "attention")
            and (nxt is not None)
            and (nxt.kind == "mlp")
            and (_strip_casts(nxt.residual) is _strip_casts(s.output))
        ):
            blocks.append(Block(len(blocks), s, nxt))
            i += 2
        else:
            blocks.append(
                Block(
                    len(blocks),
                    s if s.kind == "attention" else None,
                    s if s.kind == "mlp" else None,
                )
            )
            i += 1
    for b in blocks:
        for s in b.sublayers:
            s.add.meta[TAG] = {**s.add.meta.get(TAG, {}), "block": b.index}
    return blocks


def discover(gm: fx.GraphModule) -> Structure:
    """Find blocks, attention/MLP sites, norms and residual adds in `gm`'s graph."""
    linears = find_linears(gm)
    unmatched: list[str] = []
    subs: list[SubLayer] = []
    used_linears: set[Linear] = set()

    for core, form, q, k, v, mask in _attention_cores(gm):
        att = _match_attention(core, form, q, k, v, mask, linears)
        if isinstance(att, str):
            unmatched.append(att)
            continue
        res = _residual_add(att.o)
        if res is None:
            unmatched.append(f"attention {att.o.name}: output does not feed a residual add")
            continue
        add, residual = res
        branch_input = att.q.linear.input
        subs.append(
            SubLayer(
                "attention",
                att,
                add,
                residual,
                branch_input,
                _norm_before(branch_input, residual),
                _norm_after(add),
            )
        )
        used_linears |= {att.q.linear, att.k.linear, att.v.linear, att.o}

    for lin in dict.fromkeys(linears.values()):
        if lin in used_linears:
            continue
        res = _residual_add(lin)
        if res is None:
            continue
        mlp = _mlp_from_down(lin, linears)
        if mlp is None:
            unmatched.append(
                f"{lin.name}: feeds a residual add but is not an MLP's down projection"
            )
            continue
        add, residual = res
        branch_input = mlp.up.input
        subs.append(
            SubLayer(
                "mlp",
                mlp,
                add,
                residual,
                branch_input,
                _norm_before(branch_input, residual),
                _norm_after(add),
            )
        )

    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    subs.sort(key=lambda s: order[s.add])
    blocks = _tagged_blocks(subs) or _pair_blocks(subs)
    styles = set()
    for s in (x for b in blocks for x in b.sublayers):
        styles.add("pre-norm" if s.pre_norm else ("post-norm" if s.post_norm else "none"))
    style = styles.pop() if len(styles) == 1 else ("mixed" if styles else "none")
    hidden = 0
    if blocks:
        hv = tensor_meta(blocks[0].sublayers[0].add)
        hidden = int(hv.shape[-1]) if hv is not None else 0
    return Structure(tuple(blocks), style, tuple(unmatched), hidden)  # type: ignore[arg-type]
