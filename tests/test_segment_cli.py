"""`python -m safeclick_jax.segment`: voxel-space geometry, output format, errors. No torch: the
model directory is a randomly initialised Flax SAM 2 (tiny, 128 px) with its memory path in
`extra`, as the converter writes it."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from flax import nnx, traverse_util

from safeclick_jax.data.preprocess import normalize_intensity, to_uint8
from safeclick_jax.inference import VolumePredictor
from safeclick_jax.inference.geometry import IDENTITY_ORNT
from safeclick_jax.models.config import get_config
from safeclick_jax.models.memory import MemoryConfig, SAM2Memory
from safeclick_jax.models.registry import save_model
from safeclick_jax.models.sam2 import SAM2Image
from safeclick_jax.models.weight_map import state_dict
from safeclick_jax.segment import main

SIZE = 128


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cfg = get_config("sam2.1_hiera_t").replace(image_size=SIZE)
    model = SAM2Image(cfg, nnx.Rngs(0))
    mem = SAM2Memory(MemoryConfig.for_model(cfg), nnx.Rngs(1))
    extra = traverse_util.unflatten_dict({tuple(k.split(".")): v for k, v in state_dict(mem).items()})
    d = str(tmp_path_factory.mktemp("ckpt") / "tiny128")
    save_model(d, model, extra=extra)
    return d


def oblique_nifti(path, shape=(30, 26, 6), dtype=np.int16, four_d=None):
    """A volume in LPS-like orientation (x flipped, y/z swapped) with anisotropic spacing."""
    rng = np.random.default_rng(0)
    data = rng.integers(0, 400, shape).astype(dtype)
    if four_d:
        data = np.stack([data] * four_d, -1)
    affine = np.array([[-0.7, 0, 0, 10], [0, 0, 2.5, -5], [0, 0.9, 0, 3], [0, 0, 0, 1]], float)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return data, affine


@pytest.fixture(scope="module")
def predictor():
    cfg = get_config("sam2.1_hiera_t").replace(image_size=SIZE)
    return VolumePredictor(SAM2Image(cfg, nnx.Rngs(0)), SAM2Memory(MemoryConfig.for_model(cfg), nnx.Rngs(1)))


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_voxel_geometry_round_trip(tmp_path, predictor, axis):
    """A voxel's intensity appears at voxel_to_slice's (slice, x, y) on the slice images, and a
    slice-space mark maps back onto that voxel of the input grid (oblique file, any axis)."""
    data, _ = oblique_nifti(tmp_path / "v.nii.gz")
    p = predictor
    p.set_volume(str(tmp_path / "v.nii.gz"), axis=axis)
    slices = np.asarray(p.slices)
    expected = to_uint8(normalize_intensity(data))
    for ijk in [(7, 19, 4), (0, 0, 0), (29, 25, 5), (3, 11, 1)]:
        s, x, y = p.voxel_to_slice(ijk)
        assert s in (ijk[axis], data.shape[axis] - 1 - ijk[axis]) and x == int(x) and y == int(y)
        assert slices[s, int(y), int(x)] == expected[ijk]
        mark = np.zeros(slices.shape, np.uint8)
        mark[s, int(y), int(x)] = 1
        back = p.to_input_grid(mark)
        assert back.shape == data.shape and back[ijk] == 1 and back.sum() == 1
    with pytest.raises(ValueError, match="outside the volume"):
        p.voxel_to_slice((30, 0, 0))
    # an array input is its own voxel grid
    p.set_volume(data, axis=axis)
    s, x, y = p.voxel_to_slice((7, 19, 4))
    assert np.asarray(p.slices)[s, int(y), int(x)] == expected[7, 19, 4]
    assert (IDENTITY_ORNT[:, 1] == 1).all()


def test_segment_end_to_end(tmp_path, ckpt, capsys):
    data, affine = oblique_nifti(tmp_path / "in.nii.gz")
    out = tmp_path / "out.nii.gz"
    rc = main(
        [
            "--image",
            str(tmp_path / "in.nii.gz"),
            "--checkpoint",
            ckpt,
            "--out",
            str(out),
            "--point",
            "15,13,3",
            "--point",
            "10,5,3,0",
            "--label",
            "7",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    res = nib.load(str(out))
    assert res.shape == data.shape and np.allclose(res.affine, affine)
    assert nib.aff2axcodes(res.affine) == nib.aff2axcodes(affine)
    got = np.asarray(res.dataobj)
    assert got.dtype == np.uint8 and set(np.unique(got).tolist()) <= {0, 7}

    rc = main(
        [
            "--image",
            str(tmp_path / "in.nii.gz"),
            "--checkpoint",
            ckpt,
            "--out",
            str(out),
            "--box",
            "2,1,20,4,17",
            "--axis",
            "1",
        ]
    )  # box on slice y=17, in-plane axes x and z
    assert rc == 0, capsys.readouterr().err
    assert set(np.unique(np.asarray(nib.load(str(out)).dataobj)).tolist()) <= {0, 1}


def test_segment_errors(tmp_path, ckpt, capsys):
    oblique_nifti(tmp_path / "in.nii.gz")
    oblique_nifti(tmp_path / "4d.nii.gz", four_d=2)
    base = ["--checkpoint", ckpt, "--out", str(tmp_path / "o.nii.gz")]
    assert main(["--image", str(tmp_path / "in.nii.gz"), "--point", "30,1,1", *base]) == 2
    assert "outside the volume" in capsys.readouterr().err
    assert main(["--image", str(tmp_path / "4d.nii.gz"), "--point", "3,1,1", *base]) == 2
    assert "--volume-index" in capsys.readouterr().err
    assert main(["--image", str(tmp_path / "missing.nii.gz"), "--point", "3,1,1", *base]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["--image", str(tmp_path / "in.nii.gz"), "--box", "5,5,1,1,2", *base]) == 2
    assert "U1 >= U0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--image", str(tmp_path / "in.nii.gz"), "--point", "1,2", *base])


def test_segment_several_objects_init_labels_world(tmp_path, ckpt, capsys):
    """@ID objects, a label map to start from, and a --world click: one label map of the ids."""
    from safeclick_jax.segment import world_to_voxel

    data, affine = oblique_nifti(tmp_path / "in.nii.gz")
    init = np.zeros(data.shape, np.uint8)
    init[4:12, 18:24, 1:3] = 2  # object 2 from the label map
    nib.save(nib.Nifti1Image(init, affine), str(tmp_path / "init.nii.gz"))
    xyz, xyz3 = (affine @ np.array([15, 13, 3, 1.0]))[:3], (affine @ np.array([25, 4, 5, 1.0]))[:3]
    assert world_to_voxel(affine, xyz + 0.2) == [15, 13, 3]  # nearest voxel
    out = tmp_path / "out.nii.gz"
    args = ["--image", str(tmp_path / "in.nii.gz"), "--checkpoint", ckpt, "--out", str(out)]
    rc = main(
        args
        + ["--init-labels", str(tmp_path / "init.nii.gz"), "--world"]
        # negative numbers: --point=... (argparse would read "-1.2,..." as an option)
        + ["--point=" + ",".join(f"{v:g}" for v in xyz), "--point=" + ",".join(f"{v:g}" for v in xyz3) + "@3"]
    )
    assert rc == 0, capsys.readouterr().err
    got = np.asarray(nib.load(str(out)).dataobj)
    assert got.shape == data.shape and got.dtype == np.uint8
    assert set(np.unique(got).tolist()) <= {0, 1, 2, 3} and (got == 2).any()
    assert "voxels per object" in capsys.readouterr().out


def test_segment_object_and_label_errors(tmp_path, ckpt, capsys):
    data, affine = oblique_nifti(tmp_path / "in.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros(data.shape, np.uint8), np.eye(4)), str(tmp_path / "aff.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros((30, 26, 5), np.uint8), affine), str(tmp_path / "shape.nii.gz"))
    base = ["--image", str(tmp_path / "in.nii.gz"), "--checkpoint", ckpt, "--out", str(tmp_path / "o.nii.gz")]
    assert main([*base, "--init-labels", str(tmp_path / "aff.nii.gz")]) == 2
    assert "affine differs" in capsys.readouterr().err
    assert main([*base, "--init-labels", str(tmp_path / "shape.nii.gz")]) == 2
    assert "shape (30, 26, 5) differs" in capsys.readouterr().err
    assert main([*base, "--point", "3,3,3@2", "--label", "7"]) == 2
    assert "--label 7" in capsys.readouterr().err
    assert main([*base, "--world", "--point", "500,0,0"]) == 2
    assert "lies outside the volume" in capsys.readouterr().err
    assert main(base) == 2
    assert "give --point, --box or --init-labels" in capsys.readouterr().err
    for bad in ("3,3,3@0", "3,3,3@256", "3,3,3@x"):
        with pytest.raises(SystemExit):
            main([*base, "--point", bad])
        assert "object id after @" in capsys.readouterr().err


def test_auto_normalization(predictor):
    """set_volume's default 'auto' shows a CT (Hounsfield units) to the model in the CT window, as
    `make train` prepared its training data, and an MR-like volume with percentile clipping; a model
    whose model.json records its training data's normalization gets that one."""
    from safeclick_jax.data.synthetic_abdomen import make_volume

    ct = make_volume(0)[0][:40, :36, :3]
    p = predictor

    def slices(volume, **kw):
        p.set_volume(volume, **kw)
        return np.asarray(p.slices).copy(), p.normalization

    auto, mode = slices(ct)
    assert mode == "ct_window"
    np.testing.assert_array_equal(auto, slices(ct, normalization="ct_window", ct_window=(40, 400))[0])
    assert not np.array_equal(auto, slices(ct, normalization="percentile")[0])
    assert slices(ct.astype(np.float32) + 1000.0)[1] == "percentile"  # no air at -1000: not HU
    p.description = {"training": {"data": {"normalization": "percentile", "percentiles": [0.5, 99.5]}}}
    try:
        np.testing.assert_array_equal(slices(ct)[0], slices(ct, normalization="percentile")[0])
    finally:
        p.description = {}
    with pytest.raises(ValueError, match="'hu'"):
        p.set_volume(ct, normalization="hu")


def test_points_as_users_type_them(tmp_path, ckpt, capsys):
    """World coordinates are often negative: `--point -95.2,40.1,12` and `--point=-95.2,40.1,12`
    both work; a non-integer voxel index, NaN or Inf is refused naming the value."""
    from safeclick_jax.segment import attach_negative_values, build_parser, world_to_voxel

    data, _ = oblique_nifti(tmp_path / "in.nii.gz")
    affine = np.array([[-0.7, 0, 0, -80.0], [0, 0, 2.5, -40.0], [0, 0.9, 0, -120.0], [0, 0, 0, 1]], float)
    nib.save(nib.Nifti1Image(data, affine), str(tmp_path / "neg.nii.gz"))  # every world coordinate < 0
    a, b = (affine @ np.array([15, 13, 3, 1.0]))[:3], (affine @ np.array([10, 5, 3, 1.0]))[:3]
    assert (a < 0).all() and (b < 0).all()
    spaced = ",".join(f"{v:g}" for v in a)
    joined = ",".join(f"{v:g}" for v in b) + ",0"
    argv = ["--image", "x", "--checkpoint", "c", "--out", "o", "--point", spaced, f"--point={joined}"]
    parsed = build_parser().parse_args(attach_negative_values(argv))
    want = [[float(v) for v in text.split(",")] for text in (spaced, joined)]
    assert [p for p, _ in parsed.point] == want
    out = tmp_path / "out.nii.gz"
    args = ["--image", str(tmp_path / "neg.nii.gz"), "--checkpoint", ckpt, "--out", str(out), "--world"]
    rc = main(args + ["--point", spaced, f"--point={joined}", "--ct-window", "-600,1500"])
    assert rc == 0, capsys.readouterr().err
    assert world_to_voxel(affine, a) == [15, 13, 3] and nib.load(str(out)).shape == data.shape
    capsys.readouterr()
    base = ["--image", str(tmp_path / "in.nii.gz"), "--checkpoint", ckpt, "--out", str(tmp_path / "o.nii.gz")]
    assert main([*base, "--point", "1.5,1,1"]) == 2
    assert "--point 1.5,1,1: voxel [1.5, 1, 1]: 1.5 is not an integer voxel index" in capsys.readouterr().err
    assert main([*base, "--box", "1,1,5.5,5,2"]) == 2
    assert "5.5 is not an integer voxel index" in capsys.readouterr().err
    for bad, value in (("nan,1,1", "nan"), ("1,-inf,1", "-inf"), ("1,x,1", "'x'")):
        with pytest.raises(SystemExit):
            main([*base, "--point", bad])
        assert f"{value} is not a" in capsys.readouterr().err


def test_model_without_memory_path_names_the_option(tmp_path, ckpt, capsys):
    """A model directory without SAM 2's memory path (a training export): one line naming
    --memory-checkpoint, from the CLI and from Python."""
    from safeclick_jax.checkpoint import ModelDirError

    cfg = get_config("sam2.1_hiera_t").replace(image_size=SIZE)
    d = str(tmp_path / "nomem")
    save_model(d, SAM2Image(cfg, nnx.Rngs(0)))
    oblique_nifti(tmp_path / "in.nii.gz")
    out = str(tmp_path / "o.nii.gz")
    rc = main(["--image", str(tmp_path / "in.nii.gz"), "--checkpoint", d, "--out", out, "--point", "3,3,3"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "Traceback" not in err, err
    assert err.startswith(f"error: {d}: has no memory/video tensors") and "--memory-checkpoint DIR" in err
    with pytest.raises(ModelDirError, match="memory_checkpoint=DIR"):
        VolumePredictor.from_checkpoint(d)
    from safeclick_jax.inference import load_model

    assert load_model(d).memory is None  # the image path alone
    other = load_model(d, memory_checkpoint=ckpt, memory="required")
    assert other.memory is not None and other.memory_note is None
    untrained = load_model(d, memory="untrained")
    assert untrained.memory is not None
    assert untrained.memory_note == f"{d} has no memory path; propagation uses an untrained one"


def test_segment_dicom_series(tmp_path, ckpt, capsys):
    """A zipped DICOM series in, a NIfTI on the series' own grid (column, row, slice in position
    order; the affine from its geometry) out, and a DICOM SEG referencing the series with --out-seg."""
    import zipfile

    from safeclick_jax.data.volume_file import read_volume
    from tests.dicom_series import phantom, pydicom, rotation, series_geometry, write_series

    r = rotation(20, -12, 31)
    paths = write_series(
        tmp_path / "s", phantom(), *series_geometry(r[:, 0], r[:, 1], 2 * r[:, 2], (0.75, 0.6), (0, 0, 0))
    )
    with zipfile.ZipFile(tmp_path / "ct.zip", "w") as f:
        for p in paths:
            f.write(p, p.split("/")[-1])
    vol = read_volume(tmp_path / "ct.zip")
    out, seg = tmp_path / "out.nii.gz", tmp_path / "out_seg.dcm"
    init = np.zeros(vol.input_shape, np.uint8)
    init[6:16, 5:14, 4:8] = 3
    nib.save(nib.Nifti1Image(init, vol.image.affine), str(tmp_path / "init.nii.gz"))
    base = ["--image", str(tmp_path / "ct.zip"), "--checkpoint", ckpt, "--out", str(out)]
    rc = main([*base, "--init-labels", str(tmp_path / "init.nii.gz"), "--out-seg", str(seg)])
    text = capsys.readouterr()
    res = nib.load(str(out))
    assert res.shape == (24, 20, 12) and np.allclose(res.affine, vol.image.affine)
    got = np.asarray(res.dataobj)
    if got.any():  # a random model: the SEG needs a non-empty label map
        assert rc == 0, text.err
        ds = pydicom.dcmread(str(seg))
        assert (
            ds.Modality == "SEG"
            and ds.ReferencedSeriesSequence[0].SeriesInstanceUID == pydicom.dcmread(paths[0]).SeriesInstanceUID
        )
    else:
        assert rc == 2 and "label map is empty" in text.err
    # --out-seg needs a DICOM series input
    nib.save(nib.Nifti1Image(init.astype(np.int16), vol.image.affine), str(tmp_path / "n.nii.gz"))
    rc = main(
        [
            "--image",
            str(tmp_path / "n.nii.gz"),
            "--checkpoint",
            ckpt,
            "--out",
            str(out),
            "--point",
            "3,3,3",
            "--out-seg",
            str(seg),
        ]
    )
    assert rc == 2 and "is not one" in capsys.readouterr().err
