import numpy as np
import pytest
import torch

import reference_family as ref
from patchmosaic.denoisers.base import TrainingSet, call_generator
from patchmosaic.denoisers.score_machines import IdealScoreMachine as Ideal
from patchmosaic.denoisers.neighbours import KNNImportance, Nearest, NeighbourSearch, TopK, faiss_available

SIGMAS = [0.05, 0.5, 2.0, 30.0]
BACKENDS = ["torch"] + (["faiss"] if faiss_available() else [])


def _train(N=10, shape=(2, 4, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((N, *shape), generator=g, dtype=torch.float64) * 2 - 1


def _queries(train, B=3, noise=0.7):
    return train[:B] + noise * torch.randn(B, *train.shape[1:], dtype=train.dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 3, 7])
def test_topk_matches_brute_force(backend, k):
    train = _train()
    D = TopK(train, k=k, backend=backend)
    x = _queries(train)
    for s in SIGMAS:
        out = D(x, s)
        for b in range(3):
            np.testing.assert_allclose(out[b].numpy(), ref.topk(x[b].numpy(), train.numpy(), s, k), atol=1e-10)


def test_topk_with_all_images_is_the_ideal_denoiser():
    train = _train(8)
    x = torch.randn(4, 2, 4, 5, dtype=torch.float64)
    for s in SIGMAS:
        torch.testing.assert_close(TopK(train, k=8)(x, s), Ideal(train)(x, s), atol=1e-10, rtol=0)


@pytest.mark.skipif(not faiss_available(), reason="faiss-cpu not installed (optional)")
def test_faiss_and_torch_give_identical_neighbour_sets():
    g = torch.Generator().manual_seed(3)
    train = TrainingSet(torch.rand((200, 1, 6, 6), generator=g) * 2 - 1, None)
    x = torch.rand((16, 1, 6, 6), generator=g) * 2 - 1
    a = NeighbourSearch(train, "faiss").search(x, 12, None)
    b = NeighbourSearch(train, "torch").search(x, 12, None)
    assert [set(r) for r in a.tolist()] == [set(r) for r in b.tolist()]
    assert torch.equal(a[:, 0], b[:, 0])


def test_torch_search_is_exact_nearest_order():
    train = _train(12)
    x = _queries(train, 4)
    idx = NeighbourSearch(TrainingSet(train, None), "torch").search(x, 12, None)
    for b in range(4):
        assert idx[b].tolist() == ref.nearest_order(x[b].numpy(), train.numpy()).tolist()


def test_knn_importance_matches_documented_estimator():
    train = _train(12)
    D = KNNImportance(train, k=3, samples=5, seed=4)
    x = _queries(train)
    for call, s in enumerate([0.5, 2.0, 30.0]):
        out = D(x, s)
        U = torch.rand((3, 5), generator=call_generator(4, call), dtype=torch.float64)
        for b in range(3):
            draws = np.floor(U[b].numpy() * 9).astype(int)  # N - k = 9 tail images
            expect = ref.knn_importance(x[b].numpy(), train.numpy(), s, 3, draws)
            np.testing.assert_allclose(out[b].numpy(), expect, atol=1e-10)


def test_knn_importance_exact_at_k_equals_n_and_converges_with_samples():
    train = _train(40, shape=(1, 3, 3))
    x = _queries(train, 4, noise=1.0)
    ideal = Ideal(train)
    s = 2.0  # wide posterior: the tail matters
    torch.testing.assert_close(KNNImportance(train, k=40, samples=3)(x, s), ideal(x, s), atol=1e-10, rtol=0)
    exact = ideal(x, s)
    errors = []
    for samples in (4, 64, 4096):
        D = KNNImportance(train, k=2, samples=samples, seed=0)
        errs = [float((D(x, s) - exact).norm() / exact.norm()) for _ in range(8)]  # 8 calls, 8 draws
        errors.append(np.mean(errs))
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.2 * errors[0], errors


def test_knn_reproducible():
    train = _train(20)
    x = _queries(train)
    a, b = KNNImportance(train, k=2, samples=3, seed=1), KNNImportance(train, k=2, samples=3, seed=1)
    first = a(x, 1.0)
    assert torch.equal(first, b(x, 1.0))
    assert not torch.equal(first, a(x, 1.0))  # next call, next draws
    a.reset()
    assert torch.equal(first, a(x, 1.0))
    assert not torch.equal(first, KNNImportance(train, k=2, samples=3, seed=2)(x, 1.0))


def test_nearest_returns_the_nearest_training_image():
    train = _train(9)
    x = _queries(train, 4, noise=0.3)
    out = Nearest(train)(x, 5.0)
    for b in range(4):
        i = ref.nearest_order(x[b].numpy(), train.numpy())[0]
        assert torch.equal(out[b], train[i])


@pytest.mark.parametrize("backend", BACKENDS)
def test_conditioning(backend):
    train = _train(12)
    labels = torch.tensor([0, 1, 2] * 4)
    x = _queries(train, 3)
    lab = torch.tensor([2, 0, 2])
    out = TopK(train, k=2, labels=labels, backend=backend)(x, 0.7, label=lab)
    near = Nearest(train, labels=labels, backend=backend)(x, 0.7, label=lab)
    knn = KNNImportance(train, k=4, samples=2, labels=labels, backend=backend)(x, 0.7, label=lab)  # k = class size
    for b, c in enumerate(lab.tolist()):
        sub = train[labels == c].numpy()
        np.testing.assert_allclose(out[b].numpy(), ref.topk(x[b].numpy(), sub, 0.7, 2), atol=1e-10)
        np.testing.assert_allclose(near[b].numpy(), sub[ref.nearest_order(x[b].numpy(), sub)[0]])
        np.testing.assert_allclose(knn[b].numpy(), ref.ideal(x[b].numpy(), sub, 0.7), atol=1e-10)
    with pytest.raises(ValueError, match="k = 5 exceeds the 4 training images of class 1"):
        TopK(train, k=5, labels=labels)(x, 0.7, label=1)
    with pytest.raises(ValueError, match=r"label\(s\) \[3\] not present"):
        Nearest(train, labels=labels)(x, 0.7, label=3)


def test_float32_queries():
    train = _train(10)
    x = _queries(train)
    torch.testing.assert_close(TopK(train.float(), k=4)(x.float(), 0.5).double(), TopK(train, k=4)(x, 0.5),
                               atol=1e-5, rtol=0)


def test_bad_parameters():
    train = _train(6)
    for bad in (0, 7):
        with pytest.raises(ValueError, match=r"k must be in 1\.\.6 \(N, the training images\)"):
            TopK(train, k=bad)
    with pytest.raises(ValueError, match=r"samples must be in 1"):
        KNNImportance(train, k=2, samples=0)
    with pytest.raises(ValueError, match="unknown search backend"):
        Nearest(train, backend="annoy")


def test_without_faiss_auto_falls_back_to_torch(monkeypatch):
    import patchmosaic.denoisers.neighbours as nb

    monkeypatch.setattr(nb, "_import_faiss", lambda: None)
    train = _train(6)
    D = TopK(train, k=2)
    assert D.search.backend == "torch"
    x = _queries(train, 2)
    for b in range(2):
        np.testing.assert_allclose(D(x, 0.5)[b].numpy(), ref.topk(x[b].numpy(), train.numpy(), 0.5, 2), atol=1e-10)
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        TopK(train, k=2, backend="faiss")
