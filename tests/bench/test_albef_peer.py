"""bench/bench_albef_peer.py's parts that need neither side's model: reading a side's output, and the
bare matrix-product loop replaying exactly the products a step made."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.bench_albef_peer import bare_matmul_loop, matmul_flops, parse_result, record_matmuls

PEER_OUTPUT = """lavis AlbefPretrain: queue_size=65536
step 0: 11.2s loss 22.1
per_step_s 11.200 12.400 11.900
FLOPS lavis gflop_per_step 1946.0
RESULT lavis median_step_s 11.900 min 11.200 max 12.400 n 3 peak_rss_mb 7445 trainable_params 209890109 torch 2.13.0+cpu
"""


def test_a_sides_result_line_is_read_whole():
    row = parse_result(PEER_OUTPUT, "lavis")
    assert row["median_step_s"] == 11.9 and row["peak_rss_mb"] == 7445 and row["torch"] == "2.13.0+cpu"
    assert row["per_step_s"] == [11.2, 12.4, 11.9] and row["gflop"] == 1946.0


def test_a_side_without_a_result_line_is_an_error_showing_its_output():
    with pytest.raises(RuntimeError, match="fastvl printed no RESULT line(.|\n)*Traceback"):
        parse_result("Traceback (most recent call last):\n  boom", "fastvl")


def test_the_replayed_products_are_the_steps_own():
    layer = torch.nn.Linear(16, 24)
    x = torch.randn(5, 16, requires_grad=True)
    w = torch.randn(3, 24, 7)

    def step():
        h = layer(x)  # addmm [5,16]x[16,24]
        torch.bmm(h.expand(3, 5, 24), w).sum().backward()  # bmm, then its backward's products

    calls = record_matmuls(step)
    ops = [op for op, _, _ in calls]
    assert ops[:2] == ["addmm", "bmm"] and len(calls) >= 4  # backward: dh, dw of the bmm, dx, dW of the Linear
    assert calls[0][1][-2:] == ((5, 16), (16, 24)) and calls[0][2] == torch.float32
    counted = FlopCounterMode(display=False)
    with counted:
        step()
    assert sum(matmul_flops(op, shapes) for op, shapes, _ in calls) == counted.get_total_flops()
    bare = bare_matmul_loop(calls, reps=1)
    assert bare["gflop"] == pytest.approx(counted.get_total_flops() / 1e9) and bare["s"] > 0
