"""Projection families: bit-exact against the reference, pinned, orthonormal and
Haar-distributed."""

import hashlib
import subprocess
import sys

import numpy as np
import pytest
import torch

import uora_rt
from uora_rt.kernels import ops, reference
from uora_rt.core.projections import STREAM_A0, STREAM_B0, STREAM_QA, STREAM_QB

# Pinned forever for algorithm uora-philox-qr-v1: sha256 over the float32 little-endian bytes of
# A0, B0, QA, QB (in that order). A change here means a new algorithm id, never an edit.
GOLDEN = {
    (0, 256, 4096, 4096): "8c857002bc7eceec2c98af6b2b39048f7e4c0346b97f7e23b170b327b08b8c62",
    (7, 64, 1000, 333): "4691db628a27702e0251237053a53ac4a88de429d2fa84fed827921166746971",
    (42, 8, 96, 64): "7a8a6f65050dc478370314be2230fb98f49e23a62b00c451f9e22072a54d9c47",
}


def family_hash(seed, r, max_in, max_out):
    h = hashlib.sha256()
    for t in uora_rt.projections(seed, r, max_in, max_out):
        h.update(t.contiguous().numpy().astype("<f4").tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("family", sorted(GOLDEN))
def test_golden_hashes(family):
    assert family_hash(*family) == GOLDEN[family]


def test_philox_known_answers():
    # Random123's published known-answer vectors for Philox4x32-10.
    cases = [
        ([0, 0, 0, 0], (0, 0), [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
        ([0xFFFFFFFF] * 4, (0xFFFFFFFF, 0xFFFFFFFF),
         [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
        ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], (0xA4093822, 0x299F31D0),
         [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]),
    ]
    for ctr, key, want in cases:
        got = reference.philox4x32_10(np.array([ctr], dtype=np.uint32), key)[0]
        assert [int(v) for v in got] == want


def test_deterministic_functions_are_accurate():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.random(100_000), [1.0, 0.5, 2.0**-53, 1e-300, 0.7071067811865476]])
    x = x[x > 0]
    np.testing.assert_allclose(reference.det_log(x), np.log(x), rtol=4e-16, atol=4e-16)
    u = np.concatenate([rng.random(100_000), [0.0, 0.125, 0.25, 0.5, 0.75, 0.999999]])
    s, c = reference.det_sincos_2pi(u)
    np.testing.assert_allclose(s, np.sin(2 * np.pi * u), atol=2e-15)
    np.testing.assert_allclose(c, np.cos(2 * np.pi * u), atol=2e-15)


def test_normals_are_standard_normal():
    z = reference.philox_normals(3, 0, 400_000)
    assert abs(z.mean()) < 0.01 and abs(z.var() - 1) < 0.01
    assert abs(np.mean(z**4) - 3) < 0.05  # kurtosis of a Gaussian
    assert abs(np.mean(np.abs(z) < 1.959964) - 0.95) < 0.002


@pytest.mark.parametrize("seed,stream,n,r,transposed", [
    (0, STREAM_A0, 96, 8, True), (3, STREAM_B0, 100, 40, False),
    (2**40 + 5, STREAM_QA, 70, 70, True),
    (1, STREAM_QB, 111, 33, False), (9, STREAM_B0, 2049, 65, False)])
def test_cpp_matches_reference_bit_for_bit(seed, stream, n, r, transposed):
    want = reference.projection_factor(seed, stream, n, r, transposed)
    got = ops.projection_factor(seed, stream, n, r, transposed).numpy()
    assert got.dtype == np.float32 and np.array_equal(got, want)


def test_matches_lapack_qr():
    g = reference.philox_normals(5, STREAM_B0, 300 * 40).reshape(300, 40)
    q, rr = np.linalg.qr(g)
    q = q * np.sign(np.diag(rr))  # the diag(R) > 0 convention
    got = ops.projection_factor(5, STREAM_B0, 300, 40, False).numpy()
    np.testing.assert_allclose(got, q, atol=1e-6)


def test_family_shapes_and_orthonormality():
    a0, b0, qa, qb = uora_rt.projections(0, 256, 4096, 4096)
    assert a0.shape == qa.shape == (256, 4096) and b0.shape == qb.shape == (4096, 256)
    eye = torch.eye(256, dtype=torch.float64)
    for rows in (a0, qa):
        assert (rows.double() @ rows.double().T - eye).abs().max() <= 1e-6
    for cols in (b0, qb):
        assert (cols.double().T @ cols.double() - eye).abs().max() <= 1e-6
    assert not torch.equal(a0, qa) and not torch.equal(b0, qb)


def test_sides_depend_only_on_their_dimension():
    a0, b0, qa, qb = uora_rt.projections(11, 16, 200, 100)
    a0x, b0x, qax, qbx = uora_rt.projections(11, 16, 200, 300)
    assert torch.equal(a0, a0x) and torch.equal(qa, qax) and not torch.equal(b0[:100], b0x[:100])
    a0y, b0y, _, qby = uora_rt.projections(11, 16, 150, 100)
    assert torch.equal(b0, b0y) and torch.equal(qb, qby) and a0y.shape == (16, 150)


def test_haar_statistics():
    # For Haar-uniform O(n): E[Q00] = 0, E[tr Q] = 0, E[(tr Q)^2] = 1 (Diaconis-Shahshahani).
    # Householder QR without the diag(R) > 0 sign fix gives Q00 < 0 always, and fails all three.
    n, samples = 6, 1500
    q00, tr = [], []
    for seed in range(samples):
        q = ops.projection_factor(seed, STREAM_B0, n, n, False).double()
        q00.append(float(q[0, 0]))
        tr.append(float(q.trace()))
    q00, tr = np.array(q00), np.array(tr)
    se = 1 / np.sqrt(samples)
    assert abs(q00.mean()) < 4 * se * np.sqrt(1 / n)
    assert abs(tr.mean()) < 4 * se
    assert abs(np.mean(tr**2) - 1) < 4 * se * np.sqrt(2)


def test_thread_count_does_not_change_bits():
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.projection_factor(4, STREAM_QB, 3000, 96, False)
        torch.set_num_threads(max(2, old))
        many = ops.projection_factor(4, STREAM_QB, 3000, 96, False)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, many)


def test_another_process_gives_the_same_bits():
    code = ("import uora_rt, hashlib; h = hashlib.sha256()\n"
            "for t in uora_rt.projections(7, 64, 1000, 333): h.update(t.numpy().tobytes())\n"
            "print(h.hexdigest())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == GOLDEN[(7, 64, 1000, 333)]


def test_cache_shares_one_build():
    first = uora_rt.projections(1, 8, 64, 32)
    second = uora_rt.projections(1, 8, 64, 32)
    assert all(a is b for a, b in zip(first, second))


@pytest.mark.parametrize("args,match", [
    ((0, 65, 64, 128), "r = 65 > min"), ((0, 8, 4, 64), "r = 8 > min"), ((0, 0, 8, 8), "r must be"),
    ((-1, 4, 8, 8), "seed must be"), ((0, 4.0, 8, 8), "r must be an int"),
    ((2**63, 4, 8, 8), "seed")])
def test_impossible_requests(args, match):
    with pytest.raises(ValueError, match=match):
        uora_rt.projections(*args)
