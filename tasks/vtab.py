"""The 19 VTAB-1K tasks in NOAH's on-disk layout (``<root>/<task>/{train800,val200,train800val200,test}.txt``)."""

from __future__ import annotations

from pathlib import Path

from petl_bench.backbones import PAPER_BACKBONE
from petl_bench.config import Recipe
from petl_bench.datasets import Dataset
from petl_bench.install import hub_file, install_archive
from petl_bench.progress import progress_for
from petl_bench.registry import TASKS, register_dataset, register_suite, register_task
from petl_bench.task import FileListTask, ReportLayout, Suite

HOW_TO_GET = (
    "Get it with 'petl-bench data get vtab-1k' (NOAH's layout, from the Hugging Face hub), or prepare it with the "
    "'Data Preparation' steps of github.com/ZhangYuanhan-AI/NOAH: "
    "<root>/<task>/{train800.txt,val200.txt,train800val200.txt,test.txt,images/}."
)
HUB_REPOSITORY, HUB_FILE = "XiN0919/VTAB-1k", "vtab-1k.zip"  # V-PETL Bench's copy of NOAH's VTAB-1K

# group, task id (folder), aliases seen in other repositories, classes, test size
VTAB_TASKS = [
    ("natural", "cifar", ("cifar100",), 100, 10_000),
    ("natural", "caltech101", (), 102, 6_084),
    ("natural", "dtd", (), 47, 1_880),
    ("natural", "oxford_flowers102", ("flowers102",), 102, 6_149),
    ("natural", "oxford_iiit_pet", ("oxford_pet", "pets"), 37, 3_669),
    ("natural", "svhn", (), 10, 26_032),
    ("natural", "sun397", (), 397, 21_750),
    ("specialized", "patch_camelyon", (), 2, 32_768),
    ("specialized", "eurosat", (), 10, 5_400),
    ("specialized", "resisc45", (), 45, 6_300),
    ("specialized", "diabetic_retinopathy", ("retinopathy",), 5, 42_670),
    ("structured", "clevr_count", (), 8, 15_000),
    ("structured", "clevr_dist", (), 6, 15_000),
    ("structured", "dmlab", (), 6, 22_735),
    ("structured", "kitti", (), 4, 711),
    ("structured", "dsprites_loc", (), 16, 73_728),
    ("structured", "dsprites_ori", (), 16, 73_728),
    ("structured", "smallnorb_azi", (), 18, 12_150),
    ("structured", "smallnorb_ele", (), 9, 12_150),
]
GROUPS = ("natural", "specialized", "structured")

for group, name, aliases, classes, test_size in VTAB_TASKS:
    register_task(
        FileListTask(
            name=name,
            suite="vtab",
            group=group,
            num_classes=classes,
            aliases=aliases,
            sizes={"train800.txt": 800, "val200.txt": 200, "train800val200.txt": 1000, "test.txt": test_size},
            how_to_get=HOW_TO_GET,
        ),
        aliases=aliases,
    )

register_suite(
    Suite(
        name="vtab",
        description="VTAB-1K, 19 tasks (NOAH layout), the Convpass paper's recipe on ViT-B/16 (original ImageNet-21k)",
        backbone=PAPER_BACKBONE,
        methods=(),
        recipe=Recipe(),
        seeds=(0,),
        report=ReportLayout(
            title="VTAB-1K",
            paper="paper_vtab1k.csv",
            published=("published_vtab1k_next.csv", "published_vtab1k_third.csv"),
            reference_backbone=PAPER_BACKBONE,
            backbone_paper="paper_backbones.csv",
        ),  # fmt: skip
    )
)


OFFLINE_ADVICE = (
    f"download https://huggingface.co/datasets/{HUB_REPOSITORY}/resolve/main/{HUB_FILE} (4.7 GB) where the hub is "
    f"reachable, copy it here and run: petl-bench data get vtab-1k --from PATH/{HUB_FILE}"
)


def vtab_from_file(archive: Path, root: Path) -> None:
    """``vtab-1k.zip`` fetched elsewhere, extracted under ``<root>/vtab-1k``."""
    with progress_for() as progress:
        install_archive(archive, root / "vtab-1k", [TASKS.get(name) for _, name, *_ in VTAB_TASKS], progress)


def fetch_vtab(root: Path) -> None:
    """The zip from the hub (resumable, into the HF cache), extracted under ``<root>/vtab-1k``."""
    vtab_from_file(hub_file(HUB_REPOSITORY, HUB_FILE, advice=OFFLINE_ADVICE), root)


register_dataset(
    Dataset(
        name="vtab-1k",
        suite="vtab",
        source=f"Hugging Face hub dataset {HUB_REPOSITORY}, {HUB_FILE} (NOAH's lists and images)",
        size="4.7 GB download (kept in the HF cache) + 4.7 GB extracted",
        tasks=tuple(name for _, name, *_ in VTAB_TASKS),
        fetch=fetch_vtab,
        from_file=vtab_from_file,
    )
)
