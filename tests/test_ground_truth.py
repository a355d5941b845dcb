"""Ground truth in: masks and boxes read at the image's resolution, placed where preprocessing puts the image, and
paired with their images by the folder and manifest sources."""

from __future__ import annotations

import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from medxai.config import PreprocessConfig
from medxai.data import ImageFolderSource, ManifestSource, Record
from medxai.data.ground_truth import GroundTruth, LesionBox, fill_boxes, prepare_masks, read_ground_truth
from medxai.data.preprocess import Preprocessor
from medxai.data.sources.base import load_file_record
from medxai.errors import InvalidImageError


def _save(path: Path, array: np.ndarray, mode: str | None = None) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    if mode is not None:
        image = image.convert(mode)
    image.save(path)
    return str(path)


def _lesion(height: int, width: int, rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[rows, cols] = 255
    return mask


# -- reading ---------------------------------------------------------------------------------------------------------
def _mode_1(mask):  # 1-bit PNG
    return Image.fromarray(mask).convert("1")


def _rgb_red(mask):  # a red outline filled on black: only one channel is set
    rgb = np.zeros((*mask.shape, 3), dtype=np.uint8)
    rgb[..., 0] = mask
    return Image.fromarray(rgb)


def _rgba(mask):
    rgba = np.zeros((*mask.shape, 4), dtype=np.uint8)
    rgba[..., :3] = mask[..., None]
    rgba[..., 3] = 255
    return Image.fromarray(rgba)


def _sixteen_bit(mask):
    return Image.fromarray(mask.astype(np.uint16) * 257)


def _zero_one(mask):  # label masks saved as 0/1
    return Image.fromarray((mask > 0).astype(np.uint8))


def _blurred_edges(mask):  # anti-aliased: a 128 ring around the lesion counts, a 100 ring does not
    values = mask.copy()
    values[2, 3:7] = 128
    values[7, 3:7] = 100
    return Image.fromarray(values)


@pytest.mark.parametrize(
    "make, expected_pixels",
    [
        (lambda mask: Image.fromarray(mask), 16),
        (_mode_1, 16),
        (_rgb_red, 16),
        (_rgba, 16),
        (_sixteen_bit, 16),
        (_zero_one, 16),
        (_blurred_edges, 20),
        (lambda mask: Image.fromarray(np.zeros_like(mask)), 0),
    ],
    ids=["L", "1", "RGB-red", "RGBA", "16-bit", "0-1", "antialiased", "empty"],
)
def test_every_png_mode_reads_as_the_drawn_lesion(tmp_path, make, expected_pixels):
    mask = _lesion(10, 12, slice(3, 7), slice(3, 7))  # 4 x 4 = 16 pixels
    path = tmp_path / "mask.png"
    make(mask).save(path)
    truth = read_ground_truth(Record("a.png", 0, masks=(str(path),)), (10, 12, 3))
    assert truth.mask.dtype == bool and truth.mask.shape == (10, 12)
    assert int(truth.mask.sum()) == expected_pixels
    assert not truth.from_boxes
    if expected_pixels == 16:
        np.testing.assert_array_equal(truth.mask, mask > 0)


def test_several_masks_are_unioned(tmp_path):
    first = _save(tmp_path / "a_mask.png", _lesion(10, 10, slice(0, 4), slice(0, 4)))  # 16
    second = _save(tmp_path / "a_mask_1.png", _lesion(10, 10, slice(2, 6), slice(2, 6)))  # 16, 4 shared
    truth = read_ground_truth(Record("a.png", 0, masks=(first, second)), (10, 10))
    assert int(truth.mask.sum()) == 28


def test_a_mask_of_another_size_is_rejected_naming_the_mask_file(tmp_path):
    path = _save(tmp_path / "a_mask.png", _lesion(10, 12, slice(0, 4), slice(0, 4)))
    with pytest.raises(InvalidImageError) as caught:
        read_ground_truth(Record("a.png", 0, masks=(path,)), (12, 10))
    assert caught.value.path == path
    assert caught.value.reason == (
        "mask is 12x10 pixels but its image is 10x12; a mask must have its image's size (it is not resized)"
    )


def test_an_unreadable_mask_is_an_invalid_image_error(tmp_path):
    path = tmp_path / "a_mask.png"
    path.write_bytes(b"not a png")
    with pytest.raises(InvalidImageError) as caught:
        read_ground_truth(Record("a.png", 0, masks=(str(path),)), (10, 10))
    assert caught.value.path == str(path)


def test_no_masks_and_no_boxes_is_no_ground_truth():
    assert read_ground_truth(Record("a.png", 0), (10, 10)) is None


@pytest.mark.parametrize(
    "box, expected_rows, expected_cols",
    [
        (LesionBox(2, 1, 5, 3), (1, 3), (2, 5)),  # integers: columns x0 .. x1 - 1
        (LesionBox(1.4, 0.6, 3.6, 2.5), (1, 2), (1, 4)),  # pixel centres 1.5, 2.5, 3.5 in x; 1.5 in y (2.5 is the end)
        (LesionBox(-3, -3, 2, 2), (0, 2), (0, 2)),  # clipped at the top left
        (LesionBox(8, 6, 20, 20), (6, 8), (8, 10)),  # clipped at the bottom right
        (LesionBox.from_xywh(3, 2, 4, 1), (2, 3), (3, 7)),
    ],
)
def test_a_box_fills_the_pixels_whose_centres_it_holds(box, expected_rows, expected_cols):
    mask = fill_boxes([box], (8, 10))
    expected = np.zeros((8, 10), dtype=bool)
    expected[slice(*expected_rows), slice(*expected_cols)] = True
    np.testing.assert_array_equal(mask, expected)


def test_boxes_make_the_mask_when_there_is_no_mask_file():
    boxes = (LesionBox(0, 0, 3, 2, "Nodule"), LesionBox(2, 1, 4, 4, "Mass"))
    truth = read_ground_truth(Record("a.png", 0, boxes=boxes), (5, 5, 3))
    assert truth.from_boxes and truth.boxes == boxes
    assert int(truth.mask.sum()) == 6 + 6 - 1


@pytest.mark.parametrize("coordinates", [(3, 0, 3, 4), (0, 5, 4, 2), (float("nan"), 0, 1, 1)])
def test_a_box_without_area_is_refused(coordinates):
    with pytest.raises(ValueError):
        LesionBox(*coordinates)


def test_records_with_ground_truth_stay_small_frozen_and_picklable():
    record = Record("a.png", 1, path="/d/a.png", masks=("/d/a_mask.png",), boxes=(LesionBox(0, 0, 1, 1, "x"),))
    assert pickle.loads(pickle.dumps(record)) == record
    with pytest.raises(AttributeError):
        record.masks = ()  # type: ignore[misc]
    assert Record("a.png", 1).masks == () and Record("a.png", 1).boxes == ()


# -- placement in the model input ------------------------------------------------------------------------------------
# A 2x downscale with the antialiased bilinear filter weighs input pixels 2j-1, 2j, 2j+1, 2j+2 by 1/8, 3/8, 3/8, 1/8
# for output pixel j; an object covering input rows 4..7 therefore gives output rows 2 and 3 the value
# (3/8 + 3/8 + 1/8) = 0.875 and rows 1 and 4 the value 1/8, per axis.
@pytest.mark.parametrize(
    "resize_mode, image_size, object_rows, object_cols, expected_rows, expected_cols",
    [
        ("stretch", (16, 16), slice(4, 8), slice(8, 12), (2, 3), (4, 5)),
        ("pad", (8, 16), slice(2, 6), slice(8, 12), (1 + 2, 2 + 2), (4, 5)),  # content 4 x 8, 2 rows of padding on top
        ("pad", (16, 8), slice(8, 12), slice(2, 6), (4, 5), (1 + 2, 2 + 2)),  # 2 columns of padding on the left
    ],
)
def test_a_mask_lands_on_the_model_input_pixels_of_the_drawn_object(
    resize_mode, image_size, object_rows, object_cols, expected_rows, expected_cols
):
    image = _lesion(*image_size, object_rows, object_cols)  # the object is drawn in white on black
    preprocessor = Preprocessor(PreprocessConfig(size=8, channels=1, resize_mode=resize_mode, normalize="none"))
    prepared_image, _ = preprocessor.prepare(image)
    prepared_mask = preprocessor.prepare_mask(image > 0)

    assert prepared_mask.shape == (8, 8) and prepared_mask.dtype == torch.float32
    torch.testing.assert_close(prepared_mask, prepared_image[0], rtol=0, atol=1e-6)
    core = prepared_mask[expected_rows[0] : expected_rows[1] + 1, expected_cols[0] : expected_cols[1] + 1]
    torch.testing.assert_close(core, torch.full((2, 2), 0.875 * 0.875), rtol=0, atol=1e-6)
    hottest = divmod(int(prepared_mask.argmax()), 8)
    assert expected_rows[0] <= hottest[0] <= expected_rows[1] and expected_cols[0] <= hottest[1] <= expected_cols[1]


def test_prepare_masks_places_each_records_ground_truth_and_flags_who_has_some(tmp_path):
    image = _lesion(16, 16, slice(4, 8), slice(8, 12))
    with_mask = _save(tmp_path / "a" / "x.png", image)
    mask = _save(tmp_path / "a" / "x_mask.png", image)
    plain = _save(tmp_path / "b" / "y.png", image)
    boxed = _save(tmp_path / "b" / "z.png", image)
    bad = _save(tmp_path / "a" / "w.png", np.zeros((10, 10), dtype=np.uint8))
    records = [
        Record("a/x.png", 0, path=with_mask, masks=(mask,)),
        Record("b/y.png", 1, path=plain),
        Record("b/z.png", 1, path=boxed, boxes=(LesionBox(8, 4, 12, 8),)),
        Record("a/w.png", 0, path=bad, masks=(mask,)),  # 16 x 16 mask on a 10 x 10 image
    ]
    source = SimpleNamespace(load=load_file_record)  # prepare_masks only decodes through the source
    preprocessor = Preprocessor(PreprocessConfig(size=8, channels=1, normalize="none"))
    skipped: list[tuple[str, str]] = []

    masks, has_ground_truth = prepare_masks(source, records, preprocessor, skipped)

    assert masks.shape == (4, 8, 8) and masks.dtype == torch.float32
    assert has_ground_truth.tolist() == [True, False, True, False]
    expected = preprocessor.prepare_mask(image > 0)
    torch.testing.assert_close(masks[0], expected)
    torch.testing.assert_close(masks[2], expected)  # the box covers the same pixels as the mask
    assert float(masks[1].abs().sum()) == 0 and float(masks[3].abs().sum()) == 0
    assert skipped == [(mask, "mask is 16x16 pixels but its image is 10x10; a mask must have its image's size "
                              "(it is not resized)")]
