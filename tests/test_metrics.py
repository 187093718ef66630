import numpy as np

from qcompile.evaluation.metrics import cosine, frechet_distance, psnr_db, relative_error, sqnr_db, ssim


def test_sqnr_and_cosine_known_values():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal(100_000)
    noise = rng.standard_normal(100_000) * 0.1  # 20 dB below the signal
    assert abs(sqnr_db(ref, ref + noise) - 20.0) < 0.1
    assert sqnr_db(ref, ref) == 200.0
    assert abs(cosine(ref, 3 * ref) - 1.0) < 1e-12 and abs(cosine(ref, -ref) + 1.0) < 1e-12
    assert abs(relative_error(ref, ref + noise) - 0.1) < 0.002


def test_psnr_and_ssim():
    rng = np.random.default_rng(1)
    img = np.clip(rng.standard_normal((4, 1, 16, 16)) * 0.5, -1, 1)
    assert ssim(img, img) == 1.0 or abs(ssim(img, img) - 1.0) < 1e-12
    noise = rng.standard_normal(img.shape) * 0.02
    noisy = img + noise
    # range 2: PSNR = 10 log10(4 / mse), about 40 dB here
    assert abs(psnr_db(img, noisy) - 10 * np.log10(4 / np.mean(noise**2))) < 1e-9
    assert 39 < psnr_db(img, noisy) < 41
    assert 0.9 < ssim(img, noisy) < 1.0
    other = np.clip(rng.standard_normal(img.shape) * 0.5, -1, 1)
    assert abs(ssim(img, other)) < 0.1  # unrelated images


def test_frechet_distance_matches_closed_form():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((20_000, 3))
    b = rng.standard_normal((20_000, 3)) * 2.0 + 1.0
    # Same-distribution sets are near 0; N(0, I) vs N(1, 4I): |mu|^2 + tr(I + 4I - 2*2I) = 3 + 3 = 6.
    assert frechet_distance(a, rng.standard_normal((20_000, 3))) < 0.01
    assert abs(frechet_distance(a, b) - 6.0) < 0.15
