import torch

from fedplora import aggregation_noise, init_noise, nbytes
from fedplora import measure


def test_norm_of_sum_dense_and_gram_paths_agree(monkeypatch):
    g = torch.Generator().manual_seed(0)
    terms = [(0.3, torch.randn(40, 3, generator=g), torch.randn(3, 50, generator=g)),
             (-1.2, torch.randn(40, 5, generator=g), torch.randn(5, 50, generator=g))]
    dense = measure.norm_of_sum(terms)
    direct = torch.linalg.matrix_norm(sum(c * B.double() @ A.double() for c, B, A in terms))
    assert abs(dense - float(direct)) < 1e-9
    monkeypatch.setattr(measure, "DENSE_LIMIT", 0)
    assert abs(measure.norm_of_sum(terms) - dense) < 1e-8 * dense


def test_noise_definitions_on_a_hand_example():
    B, A = torch.eye(2), torch.eye(2)
    assert init_noise({"l": (B, A)}, {"l": (B, A)}) == 0.0
    assert init_noise({"l": (B, A)}, {"l": (torch.zeros(2, 2), A)}) == 2 ** 0.5
    # ideal mean of I and 3I is 2I; the server formed I  ->  ||I||_F = sqrt(2)
    noise = aggregation_noise([0.5, 0.5], [{"l": (B, A)}, {"l": (3 * B, A)}], {"l": (B, A)})
    assert abs(noise - 2 ** 0.5) < 1e-12


def test_nbytes_counts_dtypes():
    assert nbytes({"a": torch.zeros(3, 4), "b": torch.zeros(5, dtype=torch.float16)}) == 3 * 4 * 4 + 5 * 2
