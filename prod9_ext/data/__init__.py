"""Data for prod9: BraTS datalists, MedMNIST 3D, the embedded brain phantoms, and the one preprocessing."""

from prod9_ext.data.brats import BRATS_DATA_DIR_ENV, MODALITIES, check_modalities, load_brats_datalist, modality_id
from prod9_ext.data.datasets import DATASETS, cache_key, image_keys, load_datalist, preprocessing
from prod9_ext.data.medmnist3d import (
    MEDMNIST3D_FLAGS,
    MEDMNIST3D_SIZES,
    MEDMNIST_DATA_DIR_ENV,
    MedMNIST3DItems,
    load_medmnist3d,
)
from prod9_ext.data.phantoms import (
    PHANTOM_COMPARTMENTS,
    PHANTOM_LABELS,
    PhantomCase,
    generate_phantom_case,
    make_phantom_dataset,
    save_phantom_preview,
)
from prod9_ext.data.transforms import ScaleIntensityMaskedPercentilesd, brats_transforms, medmnist_transforms
from prod9_ext.data.validation import (
    CheckedNibabelReader,
    CheckImaged,
    check_datalist,
    check_image_file,
    check_volume,
)

__all__ = [
    "BRATS_DATA_DIR_ENV",
    "DATASETS",
    "MEDMNIST3D_FLAGS",
    "MEDMNIST3D_SIZES",
    "MEDMNIST_DATA_DIR_ENV",
    "MODALITIES",
    "PHANTOM_COMPARTMENTS",
    "PHANTOM_LABELS",
    "CheckImaged",
    "CheckedNibabelReader",
    "MedMNIST3DItems",
    "PhantomCase",
    "ScaleIntensityMaskedPercentilesd",
    "brats_transforms",
    "cache_key",
    "check_datalist",
    "check_image_file",
    "check_modalities",
    "check_volume",
    "generate_phantom_case",
    "image_keys",
    "load_brats_datalist",
    "load_datalist",
    "load_medmnist3d",
    "make_phantom_dataset",
    "medmnist_transforms",
    "modality_id",
    "preprocessing",
    "save_phantom_preview",
]
