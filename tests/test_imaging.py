import pickle

import numpy as np
import pytest
from PIL import Image

from medfusionnet.data.image_reader import read_xray
from medfusionnet.data.unreadable import UnreadableImageError


def test_png_8bit_matches_pillow(nih_dir):
    path = nih_dir / "images_256" / "00000075_000.png"
    xray = read_xray(str(path))
    expected = np.asarray(Image.open(path), dtype=np.float32) / 255
    assert xray.array.dtype == np.float32 and xray.array.shape == (256, 256)
    np.testing.assert_array_equal(xray.array, expected)
    assert xray.header == {}


def test_png_16bit_scaled_by_bit_depth(tmp_path):
    values = np.array([[0, 1000], [32768, 65535]], dtype=np.uint16)
    path = tmp_path / "x16.png"
    Image.fromarray(values).save(path)
    np.testing.assert_allclose(read_xray(str(path)).array, values / 65535.0, rtol=1e-6)


def test_rgba_with_identical_channels_equals_its_gray(nih_dir):
    path = nih_dir / "kcr64" / "images" / "00000004_000.png"  # RGBA, identical colour channels
    assert Image.open(path).mode == "RGBA"
    expected = np.asarray(Image.open(path))[..., 0] / 255.0
    np.testing.assert_allclose(read_xray(str(path)).array, expected)


def test_rgb_with_distinct_channels_uses_luminance(tmp_path):
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[..., 0] = 255
    path = tmp_path / "red.png"
    Image.fromarray(rgb).save(path)
    expected = np.asarray(Image.fromarray(rgb).convert("L")) / 255.0
    np.testing.assert_allclose(read_xray(str(path)).array, expected)


@pytest.mark.parametrize("content, reason", [(b"", "empty"), (b"not an image at all", "UnidentifiedImageError")])
def test_bad_png(tmp_path, content, reason):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(UnreadableImageError, match=reason) as info:
        read_xray(str(path))
    assert info.value.path == str(path)


def test_truncated_png(nih_dir, tmp_path):
    path = tmp_path / "trunc.png"
    path.write_bytes((nih_dir / "images_256" / "00000075_000.png").read_bytes()[:4000])
    with pytest.raises(UnreadableImageError, match="truncated") as info:
        read_xray(str(path))
    assert info.value.path == str(path) and f"cannot read image '{path}'" in str(info.value)
    copy = pickle.loads(pickle.dumps(info.value))  # as a worker process sends it
    assert (copy.path, copy.reason, str(copy)) == (info.value.path, info.value.reason, str(info.value))


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(UnreadableImageError, match="does not exist"):
        read_xray(str(tmp_path / "nope.png"))
    (tmp_path / "a.bmp").write_bytes(b"x")
    with pytest.raises(UnreadableImageError, match="unsupported suffix"):
        read_xray(str(tmp_path / "a.bmp"))


def test_real_dicoms_with_header(dicom_files):
    assert len(dicom_files) == 2
    results = {p.name[:8]: read_xray(str(p)) for p in dicom_files}
    for xray in results.values():
        assert xray.array.shape == (1024, 1024) and xray.array.dtype == np.float32
        assert xray.array.min() == 0.0 and xray.array.max() == 1.0
    siim = results["1.2.276."]
    assert siim.header == {"age": "62", "sex": "M", "view": "PA"}
    assert results["1.3.6.1."].header == {"age": "81", "sex": "M"}


def test_dicom_monochrome1_is_inverted(dicom_files, tmp_path):
    import pydicom

    source = dicom_files[0 if "1.3.6" in dicom_files[0].name else 1]  # the uncompressed one
    ds = pydicom.dcmread(source)
    normal = read_xray(str(source)).array
    ds.PhotometricInterpretation = "MONOCHROME1"
    path = tmp_path / "mono1.dcm"
    ds.save_as(path)
    np.testing.assert_allclose(read_xray(str(path)).array, 1.0 - normal, atol=1e-6)


def test_dicom_window_is_applied(dicom_files, tmp_path):
    import pydicom

    source = dicom_files[0 if "1.3.6" in dicom_files[0].name else 1]
    ds = pydicom.dcmread(source)
    raw = ds.pixel_array.astype(np.float64)
    ds.WindowCenter, ds.WindowWidth = 100, 50
    path = tmp_path / "window.dcm"
    ds.save_as(path)
    out = read_xray(str(path)).array
    # a narrow window saturates everything outside [75, 125] and stays monotonic inside it
    assert (out[raw <= 74] == 0).all() and (out[raw >= 126] == 1).all()
    inside = (raw > 76) & (raw < 124)
    assert 0 < out[inside].min() and out[inside].max() < 1


def test_dicom_without_pixel_data(dicom_files, tmp_path):
    import pydicom

    ds = pydicom.dcmread(dicom_files[0])
    del ds.PixelData
    path = tmp_path / "nopixels.dcm"
    ds.save_as(path)
    with pytest.raises(UnreadableImageError, match="no pixel data"):
        read_xray(str(path))


def test_nifti_2d_and_refused_volume(tmp_path):
    import nibabel as nib

    image = np.arange(12, dtype=np.float32).reshape(3, 4)  # (x, y)
    nib.save(nib.Nifti1Image(image, np.eye(4)), tmp_path / "x.nii.gz")
    out = read_xray(str(tmp_path / "x.nii.gz")).array
    np.testing.assert_allclose(out, image.T / 11.0)
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 3), np.float32), np.eye(4)), tmp_path / "vol.nii")
    with pytest.raises(UnreadableImageError, match="2-D"):
        read_xray(str(tmp_path / "vol.nii"))
