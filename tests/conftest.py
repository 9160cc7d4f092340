"""Shared pytest fixtures."""

import os
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    # pytest -n N: the cores shared out between the workers (and the subprocesses they start, which inherit it);
    # N workers each running torch on every core would fight for them
    _threads = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_name, _threads)


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The real scans in ``../shared/data`` beside the repository; skips when that folder is absent."""
    path = (REPO_ROOT / ".." / "shared" / "data").resolve()
    if not (path / "lung1_image.nrrd").is_file():
        pytest.skip(f"real test scans not found at {path} (../shared/data beside the repository)")
    return path


@pytest.fixture(scope="session")
def shared_data2d_dir() -> Path:
    """The real 2D images with masks in ``../shared/data2d``; skips when that folder is absent."""
    path = (REPO_ROOT / ".." / "shared" / "data2d").resolve()
    if not (path / "datalist.json").is_file():
        pytest.skip(f"real 2D test images not found at {path} (../shared/data2d beside the repository)")
    return path


@pytest.fixture(scope="session")
def test_data_dir() -> Path:
    """The small committed fixtures in ``tests/data`` (cropped real scans, see its README)."""
    return REPO_ROOT / "tests" / "data"


def _write_dicom_series(volume: np.ndarray, spacing, origin, folder: Path, modality: str) -> Path:
    """Write an int16 ``[x, y, z]`` volume (MONAI/ITK index order) as a DICOM series, identity direction."""
    pytest.importorskip("pydicom")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

    sop_class = {"CT": CTImageStorage, "MR": MRImageStorage}[modality]
    folder.mkdir(parents=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    for k in range(volume.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"{k:03d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientID, ds.InstanceNumber = modality, "test", k + 1
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.ImagePositionPatient = [float(origin[0]), float(origin[1]), float(origin[2]) + float(spacing[2]) * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]  # row spacing (y), column spacing (x)
        ds.SliceThickness = float(spacing[2])
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = np.ascontiguousarray(volume[:, :, k].T.astype(np.int16)).tobytes()
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(str(folder / f"{k:03d}.dcm"), write_like_original=False)
    return folder


@pytest.fixture(scope="session")
def write_dicom_series():
    """``write(volume_xyz, spacing_xyz, origin_lps, folder, modality)``: a DICOM series from an array (pydicom)."""
    return _write_dicom_series


#: the test files that take longest on 2 cores (pytest --durations), longest first. They are collected first, so
#: that `pytest -n2 --dist=loadfile` hands them out before the many short files and its two workers end together.
LONGEST_FILES = (
    "test_docs.py",
    "test_label.py",
    "test_model_contract.py",
    "test_export.py",
    "test_fl_simulator.py",
    "test_objects_real.py",
    "test_train_memory.py",
    "test_gpu_check.py",
    "test_label_security.py",
    "test_train_faults.py",
    "test_evaluate_interactive.py",
)


def pytest_collection_modifyitems(session, config, items):
    """Longest files first (see :data:`LONGEST_FILES`); every other test keeps its place in collection order."""
    rank = {name: n for n, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FILES)))
