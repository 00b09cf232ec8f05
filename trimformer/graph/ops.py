"""Named sets of ATen ops that passes and structure discovery match by identity."""

from __future__ import annotations

import operator

import torch

from trimformer.kernels.local_attention import LOCAL_ATTENTION as _LOCAL_ATTENTION  # registers it

aten = torch.ops.aten

LINEAR = {aten.linear.default}
# GPT-2's Conv1D: view(x, [-1, in]) -> addmm(bias, x2d, W[in, out]) -> view(..., [B, S, out])
ADDMM = {aten.addmm.default}
SDPA = {aten.scaled_dot_product_attention.default}
# trimformer's sliding-window + sink attention (kernels/local_attention.py); SDPA's argument names
LOCAL_ATTENTION = {_LOCAL_ATTENTION}
SOFTMAX = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
MATMUL = {aten.matmul.default, aten.bmm.default}
LAYER_NORM = {aten.layer_norm.default}
ADD = {aten.add.Tensor}
MUL = {aten.mul.Tensor}
GETITEM = {operator.getitem}
SPLIT = {aten.split.Tensor, aten.split_with_sizes.default}
DROPOUT = {aten.dropout.default}
METADATA_ASSERTS = {aten._assert_tensor_metadata.default}

# Ops that move or reinterpret a tensor without computing on its values.
SHAPE = {
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.transpose.int,
    aten.permute.default,
    aten.contiguous.default,
    aten.clone.default,
    aten.expand.default,
    aten.unsqueeze.default,
    aten.squeeze.dim,
    aten.flatten.using_ints,
    aten.alias.default,
    aten.to.dtype,
    aten.to.dtype_layout,
    aten._to_copy.default,
    aten.type_as.default,
}

ACTIVATIONS = {
    aten.gelu.default: "gelu",
    aten.silu.default: "silu",
    aten.relu.default: "relu",
    aten.sigmoid.default: "sigmoid",
    aten.tanh.default: "tanh",
}

# Elementwise value ops an MLP branch or a rotary embedding is built from.
ELEMENTWISE = {
    aten.mul.Tensor,
    aten.mul.Scalar,
    aten.add.Tensor,
    aten.add.Scalar,
    aten.sub.Tensor,
    aten.div.Tensor,
    aten.div.Scalar,
    aten.pow.Tensor_Scalar,
    aten.neg.default,
    aten.cat.default,
    aten.slice.Tensor,
    aten.rsqrt.default,
    aten.mean.dim,
    *ACTIVATIONS,
}

RMS_POW = {aten.pow.Tensor_Scalar}
RMS_MEAN = {aten.mean.dim}
RMS_RSQRT = {aten.rsqrt.default}
COMPARE = {aten.le.Tensor, aten.lt.Tensor, aten.ge.Tensor, aten.gt.Tensor}
ARANGE = {aten.arange.default, aten.arange.start, aten.arange.start_step}
EMBEDDING = {aten.embedding.default}
CONV = {aten.conv2d.default, aten.convolution.default}
