"""Media decoding (CPU and DALI backends), Qwen2-VL patch layout, frame sampling, resampling.

All media is generated in a temp dir: PNG/JPEG (Pillow), WAV/FLAC (soundfile), MJPEG/VP8/VP9 and
H.264 video (PyAV). DALI runs its CPU operators here (device_id=None); DALI tests are skipped
where DALI does not import.

Tolerances between backends (both decode the same bytes):
  * PNG, WAV, FLAC: exact.
  * JPEG: max |diff| <= 2 (DALI's nvImageCodec/libjpeg-turbo vs Pillow's libjpeg; identical here).
  * resize inside the decoder (DALI fn.resize cubic+antialias vs Pillow BICUBIC): max <= 4,
    mean <= 0.5.
  * video frames (DALI's FFmpeg-based CPU decoder vs PyAV + swscale): mean |diff| <= 2.5, and
    99 % of values within 8 (different YUV->RGB conversion / chroma upsampling).
"""

from __future__ import annotations

import logging
import math
import pickle
import struct
import zlib

import numpy as np
import pytest
import torch

from megatron_omni.data.media import common as media_common
from megatron_omni.data.media import dali as media_dali
from megatron_omni.data.media.audio import resample, resampled_length, to_mono
from megatron_omni.data.media.common import MediaError
from megatron_omni.data.media.cpu_decode import CPUBackend
from megatron_omni.data.media.probe import probe_audio, probe_image, probe_video
from megatron_omni.data.media.processor import MediaProcessor
from megatron_omni.data.media.select import select_backend
from megatron_omni.data.media.vision import (
    VideoSettings,
    image_num_tokens,
    normalize,
    num_sampled_frames,
    patchify,
    pixels_to_patches,
    sample_frame_indices,
    smart_resize,
    video_num_tokens,
)

HAVE_DALI = media_dali.dali_available()
needs_dali = pytest.mark.skipif(not HAVE_DALI, reason="NVIDIA DALI not importable")


# --------------------------------------------------------------------------------------------------
# test media


def _smooth_rgb(h, w, phase=0.0, seed=0):
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 127 + 100 * np.sin(xx / 23.0 + phase)
    g = 127 + 100 * np.cos(yy / 17.0 - phase)
    b = 127 + 60 * np.sin((xx + yy) / 31.0 + 2 * phase)
    noise = np.random.default_rng(seed).normal(0, 6, (h, w, 3))
    return np.clip(np.stack([r, g, b], -1) + noise, 0, 255).astype(np.uint8)


def _write_video(path, codec, n=24, fps=10, h=112, w=168, pix="yuv420p"):
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = w, h, pix
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(_smooth_rgb(h, w, phase=0.3 * i, seed=i), "rgb24")
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def _png_with_header_size(src_png: bytes, width: int, height: int) -> bytes:
    """Rewrite the IHDR of a small PNG to claim width x height (CRC fixed), pixels unchanged."""
    assert src_png[12:16] == b"IHDR"
    body = struct.pack(">II", width, height) + src_png[24:29]
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + body) & 0xFFFFFFFF)
    return src_png[:16] + body + crc + src_png[33:]


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    import soundfile as sf
    from PIL import Image

    d = tmp_path_factory.mktemp("media")
    m = {}
    for name, (h, w) in {
        "small": (56, 84),
        "wide": (123, 1000),
        "tiny": (20, 30),
        "mid": (300, 457),
    }.items():
        Image.fromarray(_smooth_rgb(h, w, seed=h)).save(d / f"{name}.png")
        m[f"{name}.png"] = d / f"{name}.png"
    Image.fromarray(_smooth_rgb(300, 457, seed=1)).save(d / "mid.jpg", quality=90)
    Image.fromarray(_smooth_rgb(240, 200, seed=2)).convert("L").save(d / "gray.jpg", quality=85)
    rgba = np.dstack(
        [
            _smooth_rgb(77, 123, seed=3),
            np.linspace(0, 255, 77 * 123).reshape(77, 123).astype(np.uint8),
        ]
    )
    Image.fromarray(rgba, "RGBA").save(d / "alpha.png")
    Image.fromarray(_smooth_rgb(3, 700, seed=4)).save(d / "ratio.png")  # 233:1
    m.update({k: d / k for k in ("mid.jpg", "gray.jpg", "alpha.png", "ratio.png")})

    jpg = (d / "mid.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    (d / "huge.png").write_bytes(
        _png_with_header_size((d / "small.png").read_bytes(), 20000, 20000)
    )
    (d / "empty.wav").write_bytes(b"")
    (d / "text.mp4").write_text("this is not a video\n" * 10)
    m.update({k: d / k for k in ("truncated.jpg", "huge.png", "empty.wav", "text.mp4")})
    m["missing"] = d / "does_not_exist.jpg"

    t = np.arange(int(44100 * 1.5)) / 44100
    stereo = np.stack([0.5 * np.sin(2 * np.pi * 440 * t), 0.3 * np.sin(2 * np.pi * 1250 * t)], 1)
    sf.write(d / "stereo.wav", stereo, 44100, subtype="PCM_16")
    t = np.arange(int(22050 * 0.7)) / 22050
    sf.write(d / "mono.flac", 0.4 * np.sin(2 * np.pi * 300 * t), 22050)
    m.update({k: d / k for k in ("stereo.wav", "mono.flac")})

    _write_video(d / "mjpeg.avi", "mjpeg", pix="yuvj420p")
    _write_video(d / "vp8.webm", "libvpx")
    _write_video(d / "vp9.webm", "libvpx-vp9", n=30, fps=15, h=84, w=140)
    _write_video(d / "h264.mp4", "libx264", n=26, fps=12)
    m.update({k: d / k for k in ("mjpeg.avi", "vp8.webm", "vp9.webm", "h264.mp4")})
    return m


@pytest.fixture(scope="module")
def cpu():
    return CPUBackend(num_threads=2)


@pytest.fixture(scope="module")
def dali():
    if not HAVE_DALI:
        pytest.skip("NVIDIA DALI not importable")
    return media_dali.DALIBackend(device="cpu", max_batch_size=4)


BACKENDS = ["cpu", pytest.param("dali", marks=needs_dali)]


@pytest.fixture(scope="module")
def processors(cpu, request):
    procs = {"cpu": MediaProcessor(cpu)}
    if HAVE_DALI:
        procs["dali"] = MediaProcessor(request.getfixturevalue("dali"))
    return procs


# --------------------------------------------------------------------------------------------------
# resize rule, token counts, sampling


def test_smart_resize_worked_examples():
    # nearest multiples of 28, already inside [100, 2560] * 28*28
    assert smart_resize(480, 640) == (476, 644)
    assert image_num_tokens(480, 640) == (476 // 14) * (644 // 14) // 4 == 391
    # too big: scale by sqrt(4000*6000 / max_pixels) = 3.458, then floor -> 41*28 x 61*28
    assert smart_resize(4000, 6000) == (1148, 1708)
    # too small: 20x30 -> scale by sqrt(78400 / 600) = 11.43, then ceil -> 9*28 x 13*28
    assert smart_resize(20, 30) == (252, 364)
    assert image_num_tokens(20, 30) == 18 * 26 // 4 == 117
    # aspect ratio must stay below 200
    assert smart_resize(1, 199)[0] == 28
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(1, 200)
    with pytest.raises(ValueError):
        smart_resize(0, 10)


def test_smart_resize_agrees_with_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        smart_resize as hf_smart_resize,
    )

    rng = np.random.default_rng(0)
    for _ in range(2000):
        h = int(rng.integers(1, 9000))
        w = int(np.clip(h * np.exp(rng.uniform(-5, 5)), 1, 9000))
        if max(h, w) / min(h, w) >= 199:
            continue
        ours = smart_resize(h, w, 28, 100 * 28 * 28, 2560 * 28 * 28)
        assert ours == hf_smart_resize(h, w, 28, 100 * 28 * 28, 2560 * 28 * 28), (h, w)
        assert ours[0] % 28 == 0 and ours[1] % 28 == 0


def test_video_frame_count_and_sampling():
    v = VideoSettings()
    assert num_sampled_frames(300, 30.0, v) == 20  # 10 s at 2 fps
    assert num_sampled_frames(30, 30.0, v) == 4  # 1 s -> min 4
    assert num_sampled_frames(99, 30.0, v) == 6  # 3.3 s -> 6.6 -> nearest even 6
    assert num_sampled_frames(6000, 30.0, v) == 120  # 200 s -> max 120
    assert num_sampled_frames(7, 30.0, VideoSettings(num_frames=15)) == 16  # fixed, made even
    assert num_sampled_frames(99, 30.0, VideoSettings(min_frames=5, max_frames=9)) == 6

    idx = sample_frame_indices(300, 30.0, v)
    assert len(idx) == 20 and idx[0] == 0 and idx[-1] == 299 and idx == sorted(idx)
    assert sample_frame_indices(2, 10.0, v) == [0, 0, 1, 1]  # short clips repeat frames

    rnd = VideoSettings(sampling="random")
    a, b, c = (sample_frame_indices(300, 30.0, rnd, seed=s) for s in (1, 1, 2))
    assert a == b and a != c and len(a) == len(c) == 20
    for k, i in enumerate(a):  # one frame per equal segment
        assert 15 * k <= i < 15 * (k + 1)

    # token budget: a 16-frame video costs 1024..6144 tokens whatever its resolution
    fixed = VideoSettings(num_frames=16)
    assert video_num_tokens(160, 30.0, 1080, 1920, fixed) <= 6144
    assert video_num_tokens(160, 30.0, 1080, 1920, fixed) > 5000
    assert video_num_tokens(160, 30.0, 64, 64, fixed) >= 1024


# --------------------------------------------------------------------------------------------------
# patch layout


def test_patchify_layout_matches_transformers(media, processors):
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    hf = Qwen2VLImageProcessorPil(min_pixels=100 * 28 * 28, max_pixels=2560 * 28 * 28)
    proc = processors["cpu"]
    for name in ("small.png", "wide.png", "tiny.png", "mid.jpg", "gray.jpg", "alpha.png"):
        ref = hf(images=[Image.open(media[name])], return_tensors="np")
        ours = proc.image(media[name])
        assert list(ours.grid_thw) == ref["image_grid_thw"][0].tolist(), name
        np.testing.assert_allclose(
            ours.patches.numpy(), ref["pixel_values"], atol=2e-6, rtol=0, err_msg=name
        )

    # do_resize=False on an already 28-aligned image: patchify alone
    rgb = np.asarray(Image.open(media["small.png"]))
    ref = hf(images=[Image.fromarray(rgb)], do_resize=False, return_tensors="np")["pixel_values"]
    patches, grid = patchify(normalize(rgb))
    assert grid == (1, 4, 6)
    np.testing.assert_allclose(patches, ref, atol=2e-6, rtol=0)


def test_patchify_video_layout():
    rng = np.random.default_rng(0)
    frames = rng.standard_normal((3, 3, 56, 84)).astype(np.float32)
    patches, grid = patchify(frames)
    assert grid == (2, 4, 6) and patches.shape == (48, 3 * 2 * 14 * 14)
    rows = patches.reshape(2, 2, 3, 2, 2, 3, 2, 14, 14)  # t, h/2, w/2, 2, 2, C, temporal, 14, 14
    for t, by, bx, my, mx in [(0, 0, 0, 0, 0), (0, 1, 2, 1, 0), (1, 0, 1, 0, 1), (1, 1, 2, 1, 1)]:
        y, x = (by * 2 + my) * 14, (bx * 2 + mx) * 14
        for k in range(2):
            src = frames[min(2 * t + k, 2)]  # the odd third frame is repeated to fill the pair
            np.testing.assert_array_equal(
                rows[t, by, bx, my, mx, :, k], src[:, y : y + 14, x : x + 14]
            )
    # merge groups are 4 consecutive rows: row 1 is the patch right of row 0, row 2 the one below
    np.testing.assert_array_equal(patches[1].reshape(3, 2, 14, 14)[:, 0], frames[0][:, 0:14, 14:28])
    np.testing.assert_array_equal(patches[2].reshape(3, 2, 14, 14)[:, 0], frames[0][:, 14:28, 0:14])
    with pytest.raises(ValueError):
        patchify(frames[:, :, :50])
    # the processor's fused uint8 path equals patchify(normalize(.)) on a 3-frame clip
    pixels = rng.integers(0, 256, (3, 56, 84, 3), dtype=np.uint8)
    ref, ref_grid = patchify(normalize(pixels))
    fused, grid = pixels_to_patches(pixels)
    assert grid == ref_grid == (2, 4, 6)
    np.testing.assert_allclose(fused, ref, atol=2e-6, rtol=0)


# --------------------------------------------------------------------------------------------------
# audio


def _snr_db(y, sr, f):
    ref = np.sin(2 * np.pi * f * np.arange(len(y)) / sr)
    e = (y - ref)[100:-100]
    return 10 * np.log10((ref[100:-100] ** 2).sum() / (e**2).sum())


@pytest.mark.parametrize(
    "sr_in,f", [(44100, 1000.0), (44100, 3300.0), (8000, 1000.0), (44101, 1000.0)]
)
def test_resampler_keeps_tone(sr_in, f):
    x = np.sin(2 * np.pi * f * np.arange(sr_in) / sr_in)  # 1 s
    y = resample(x, sr_in, 16000)
    assert y.dtype == np.float32 and len(y) == resampled_length(sr_in, sr_in, 16000) == 16000
    assert _snr_db(y, 16000, f) > 60
    spectrum = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    assert abs(np.argmax(spectrum) * 16000 / len(y) - f) <= 1.0


def test_resampler_is_band_limited():
    x = np.sin(2 * np.pi * 12000 * np.arange(44100) / 44100)  # above the new 8 kHz Nyquist
    y = resample(x, 44100, 16000)
    assert np.sqrt(np.mean(y[100:-100] ** 2)) < 1e-3  # would alias to 4 kHz at full amplitude
    assert resampled_length(1000, 44100, 16000) == math.ceil(1000 * 16000 / 44100)
    np.testing.assert_array_equal(resample(x[:50], 16000, 16000), x[:50].astype(np.float32))
    np.testing.assert_allclose(to_mono(np.array([[1.0, 0.0], [0.5, 0.5]])), [0.5, 0.5])


# --------------------------------------------------------------------------------------------------
# DALI (CPU operators) vs CPU backend


@needs_dali
def test_dali_images_agree_with_cpu(media, cpu, dali):
    names = ["small.png", "wide.png", "alpha.png", "mid.jpg", "gray.jpg"]
    ref = cpu.decode_images([media[n] for n in names])
    got = dali.decode_images([media[n] for n in names])
    for n, r, g in zip(names, ref, got):
        assert g.shape == r.shape and g.dtype == np.uint8, n
        diff = np.abs(g.astype(int) - r.astype(int))
        assert diff.max() <= (2 if n.endswith(".jpg") else 0), (n, diff.max())
    sizes = [(252, 364), (112, 896), (84, 112), (308, 448), (224, 196)]
    ref = cpu.decode_images([media[n] for n in names], sizes)
    got = dali.decode_images([media[n] for n in names], sizes)
    for n, s, r, g in zip(names, sizes, ref, got):
        assert g.shape == r.shape == (*s, 3), n
        diff = np.abs(g.astype(int) - r.astype(int))
        assert diff.max() <= 4 and diff.mean() <= 0.5, (n, diff.max(), diff.mean())


@needs_dali
def test_dali_audio_agrees_exactly(media, cpu, dali):
    for name in ("stereo.wav", "mono.flac"):
        (r, rsr), (g, gsr) = cpu.decode_audio(media[name]), dali.decode_audio(media[name])
        assert rsr == gsr and g.dtype == np.float32
        np.testing.assert_array_equal(g, r)
    assert cpu.decode_audio(media["stereo.wav"])[0].shape == (66150, 2)


@needs_dali
@pytest.mark.parametrize("name", ["mjpeg.avi", "vp8.webm", "vp9.webm"])
def test_dali_video_agrees_with_cpu(media, cpu, dali, name):
    info = probe_video(media[name])
    idx = [0, 3, 3, info.num_frames // 2, info.num_frames - 1]
    r = cpu.decode_video(media[name], idx)
    g = dali.decode_video(media[name], idx)
    assert g.shape == r.shape == (5, info.height, info.width, 3)
    diff = np.abs(g.astype(int) - r.astype(int))
    assert diff.mean() <= 2.5 and np.percentile(diff, 99) <= 8, (
        diff.mean(),
        np.percentile(diff, 99),
    )
    # the repeated index really is the same frame, and different indices are different frames
    np.testing.assert_array_equal(g[1], g[2])
    assert np.abs(g[0].astype(int) - g[4]).mean() > 10


@needs_dali
def test_dali_h264_falls_back_to_pyav(media, cpu, dali, caplog):
    media_common._logged.clear()
    with caplog.at_level(logging.INFO, logger="megatron_omni.data.media"):
        g = dali.decode_video(media["h264.mp4"], [0, 5, 25], size=(112, 168))
        dali.decode_video(media["h264.mp4"], [1])
    np.testing.assert_array_equal(
        g, cpu.decode_video(media["h264.mp4"], [0, 5, 25], size=(112, 168))
    )
    notes = [r.getMessage() for r in caplog.records if "h264" in r.getMessage()]
    assert len(notes) == 1 and "PyAV" in notes[0]


@needs_dali
def test_dali_batch_isolates_bad_sample(media, dali):
    out = dali.decode_images(
        [media["mid.jpg"], media["truncated.jpg"], media["small.png"], media["huge.png"]]
    )
    assert out[0].shape == (300, 457, 3) and out[2].shape == (56, 84, 3)
    assert isinstance(out[1], MediaError) and out[1].reason == "corrupt_image"
    assert isinstance(out[3], MediaError) and out[3].reason == "image_too_large"
    assert dali.decode_image(media["mid.jpg"]).shape == (
        300,
        457,
        3,
    )  # pipeline rebuilt after the error


# --------------------------------------------------------------------------------------------------
# header probes == decoded reality


@pytest.mark.parametrize("backend", BACKENDS)
def test_probe_token_counts_equal_decoded(media, processors, backend):
    proc = processors[backend]
    for name in ("small.png", "wide.png", "tiny.png", "mid.jpg", "gray.jpg", "alpha.png"):
        h, w = probe_image(media[name])
        planned = proc.image_tokens(media[name])
        vi = proc.image(media[name])
        assert planned == vi.num_tokens == image_num_tokens(h, w) == vi.patches.shape[0] // 4, name
        assert vi.patches.shape[1] == 1176 and vi.patches.dtype == torch.float32
    for name in ("mjpeg.avi", "vp8.webm", "vp9.webm", "h264.mp4"):
        n, fps, h, w = probe_video(media[name])
        planned = proc.video_tokens(media[name])
        vi = proc.video(media[name])
        assert (
            planned == vi.num_tokens == video_num_tokens(n, fps, h, w) == vi.patches.shape[0] // 4
        ), name
    rnd = MediaProcessor(proc.backend, video=VideoSettings(sampling="random", num_frames=6), seed=3)
    a, b = rnd.video(media["vp9.webm"]), rnd.video(media["vp9.webm"], seed=4)
    assert (
        a.num_tokens == b.num_tokens == rnd.video_tokens(media["vp9.webm"]) and a.grid_thw[0] == 3
    )
    assert not torch.equal(a.patches, b.patches)
    for name in ("stereo.wav", "mono.flac"):
        wav = proc.audio(media[name])
        assert wav.dtype == torch.float32 and wav.ndim == 1
        assert wav.shape[0] == proc.audio_num_samples(media[name])
        assert proc.audio_tokens(media[name]) == 256


def test_probes_read_headers(media):
    assert tuple(probe_image(media["mid.jpg"])) == (300, 457)
    assert tuple(probe_audio(media["stereo.wav"])) == (66150, 44100)
    n, fps, h, w = probe_video(media["vp9.webm"])  # WebM stores no frame count: packets counted
    assert (n, fps, h, w) == (30, 15.0, 84, 140)
    assert probe_video(media["h264.mp4"]).codec == "h264"


# --------------------------------------------------------------------------------------------------
# bad input -> MediaError with a reason, never a crash


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_raise_media_error(media, processors, backend):
    proc = processors[backend]
    be = proc.backend
    cases = [
        (lambda: proc.image(media["truncated.jpg"]), "corrupt_image"),
        (lambda: be.decode_image(media["truncated.jpg"]), "corrupt_image"),
        (lambda: be.decode_image(media["text.mp4"]), "corrupt_image"),
        (lambda: proc.image(media["huge.png"]), "image_too_large"),
        (lambda: proc.image_tokens(media["huge.png"]), "image_too_large"),
        (lambda: proc.image(media["ratio.png"]), "bad_aspect_ratio"),
        (lambda: proc.image(media["missing"]), "missing_file"),
        (lambda: proc.video(media["text.mp4"]), "unreadable_video"),
        (lambda: be.decode_video(media["text.mp4"], [0]), "unreadable_video"),
        (lambda: proc.video(media["missing"]), "missing_file"),
        (lambda: be.decode_video(media["vp8.webm"], [0, 24]), "bad_frame_index"),
        (lambda: proc.audio(media["empty.wav"]), "unreadable_audio"),
        (lambda: proc.audio_tokens(media["empty.wav"]), "unreadable_audio"),
        (lambda: proc.audio(media["text.mp4"]), "unreadable_audio"),
        (lambda: proc.audio(media["missing"]), "missing_file"),
    ]
    for call, reason in cases:
        with pytest.raises(MediaError) as ei:
            call()
        assert ei.value.reason == reason, (reason, str(ei.value))
        assert isinstance(ei.value, ValueError)
    # the pixel cap is configurable; the huge PNG's pixel data is a 56x84 image, so refusing it
    # as too large (not as corrupt) proves the check ran on the header before decoding
    small_cap = CPUBackend(max_image_pixels=10_000)
    with pytest.raises(MediaError, match="image_too_large"):
        small_cap.decode_image(media["mid.jpg"])
    assert small_cap.decode_image(media["small.png"]).shape == (56, 84, 3)
    err = pickle.loads(pickle.dumps(MediaError("corrupt_image", "bad", "x.jpg")))
    assert (err.reason, err.source, str(err)) == (
        "corrupt_image",
        "x.jpg",
        "corrupt_image: bad [x.jpg]",
    )
    # batch API: errors come back in place, good items still decode
    out = proc.images([media["small.png"], media["missing"], media["truncated.jpg"]])
    assert out[0].num_tokens == 117 and [o.reason for o in out[1:]] == [
        "missing_file",
        "corrupt_image",
    ]


# --------------------------------------------------------------------------------------------------
# backend selection


def test_select_backend(monkeypatch, caplog):
    media_common._logged.clear()
    with caplog.at_level(logging.INFO, logger="megatron_omni.data.media"):
        assert isinstance(select_backend("cpu"), CPUBackend)
        select_backend("cpu")
    assert sum("media backend (cpu)" in r.getMessage() for r in caplog.records) == 1
    auto = select_backend("auto")
    assert isinstance(auto, media_dali.DALIBackend if HAVE_DALI else CPUBackend)
    with pytest.raises(ValueError, match="'auto', 'dali' or 'cpu'"):
        select_backend("gpu-magic")

    monkeypatch.setattr(
        media_dali, "_dali_state", {"mod": None, "err": ImportError("no module named nvidia.dali")}
    )
    assert isinstance(select_backend("auto"), CPUBackend)
    with pytest.raises(RuntimeError, match="DALI cannot be imported.*'cpu'"):
        select_backend("dali")
