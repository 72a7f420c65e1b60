"""Examples the property suite found, kept as plain tests (each builds its model explicitly)."""
from __future__ import annotations

import pytest

from propgen import F32, Case, Net, Spelling, core, prove_left_alone

PLAIN = Spelling(square="pow", exponent="float", divide="div", mul_first=False, eps=1e-5, eps_first=False,
                 eps_shape=(), eps_cast=False, dup_sub=False, dup_mean=False, fn_body=False, negative_axes=True)


@pytest.mark.parametrize("pass_name, kind", [("fuse-layernorm", "mean"), ("fuse-rmsnorm", "rms")])
@pytest.mark.parametrize("form, opset", [(1, 13), (0, 13), (0, 18), (0, 11)])
def test_bessel_corrected_variance_is_skipped_with_a_reason(pass_name, kind, form, opset):
    """torch.var's default (unbiased) variance, N / (N - 1) times the mean of squares (form 1) or
    ReduceSum / (N - 1) (form 0), was not a candidate at all: left alone, but with no skip record."""
    net = Net(opset, F32)
    t = core(net, "x", [-1], PLAIN, kind, F32, miss="bessel", miss_value=form, n_elems=8)
    model = net.finish(t, ["N", 5, 8], F32, ["N", 5, 8], F32)
    prove_left_alone(Case(model, pass_name, reason="Bessel's correction", spec=dict(form=form, opset=opset)))


def test_rmsnorm_squares_of_an_int32_round_trip_are_skipped_with_a_reason():
    """x / sqrt(mean(float(int32(x))^2) + eps): the statistics of truncated values, not of x.
    It was not a candidate at all: left alone, but with no skip record."""
    net = Net(18, F32)
    t = core(net, "x", [-1], PLAIN, "rms", F32, miss="int_cast")
    model = net.finish(t, ["N", 8], F32, ["N", 8], F32)
    prove_left_alone(Case(model, "fuse-rmsnorm", reason="mean of squares is taken of"))
