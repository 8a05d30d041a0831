"""precision=None follows torch's float32 matmul setting; explicit values override it."""
import pytest
import torch

from rqvae_fast.precision import resolve_precision


@pytest.mark.parametrize("setting, expected", [("highest", "ieee"), ("high", "tf32"), ("medium", "bf16")])
def test_none_follows_torch(setting, expected):
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision(setting)
        assert resolve_precision(None) == expected
        assert resolve_precision("ieee") == "ieee"
    finally:
        torch.set_float32_matmul_precision(old)


def test_unknown_precision_is_rejected():
    with pytest.raises(ValueError, match="precision must be None or one of"):
        resolve_precision("fp16")
