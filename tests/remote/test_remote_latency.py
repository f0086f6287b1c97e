"""Remote reads at a distance: latency hidden by concurrency, bytes sized by the access
pattern, a Range fallback that stays ranged, and ``--prefetch``.

One project of 2,000 small images (~850 B) in one blob is uploaded once per module; each
test starts from a healthy emulator with zeroed counters.
"""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sly_emulator import Emulator
from sly_emulator.seed import upload_local_project

from blobfs.cache.blocks import BlockCache, CachedBlob, ReadPattern
from blobfs.errors import BlobfsError, to_errno
from blobfs.format import pack
from blobfs.format.pack import ProjectPacker
from blobfs.model import DatasetRecord
from blobfs.sly import api as api_module
from blobfs.sly.api import ANN_ADD_BATCH, ANN_BATCH, SuperviselyApi, SuperviselyWriteApi
from blobfs.sources.readers import BytesReader
from blobfs.sources.remote import AnnRef, RemoteProjectSource
from blobfs.transport.http import HttpClient
from blobfs.view.tree import ListingRun, ProjectView
from tests.support import harness
from tests.support.sample import make_images

from .conftest import TOKEN, mount_remote

pytestmark = [pytest.mark.remote]

COUNT = 2000
#: annotations.bulk.info requests for all of it (the SDK's batch of 50 ids)
BATCHES = COUNT // ANN_BATCH


@dataclass
class Big:
    emu: Emulator
    pid: int
    dataset_id: int
    blob_size: int
    images: dict[str, bytes]
    anns: dict[str, bytes]


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Big]:
    root = tmp_path_factory.mktemp("big")
    paths = make_images(root / "images", COUNT, 16, 16)
    with pytest.MonkeyPatch.context() as mp:  # test data need not survive a power cut
        mp.setattr(pack, "write_atomic", lambda path, data: path.write_bytes(data))
        mp.setattr(pack, "fsync_dir", lambda path: None)
        mp.setattr(pack.os, "fsync", lambda fd: None)
        ProjectPacker(root / "project", "train", blob_size=64 << 20).pack(paths)
    [blob] = (root / "project" / "blob").iterdir()
    emu = Emulator(root / "emu", TOKEN).start()
    try:
        pid = upload_local_project(emu.url, TOKEN, root / "project")
        [ds] = emu.store.all("datasets", pid)
        yield Big(
            emu,
            pid,
            ds["id"],
            blob.stat().st_size,
            {p.name: p.read_bytes() for p in paths},
            {
                p.name: (root / "project" / "train" / "ann" / f"{p.name}.json").read_bytes()
                for p in paths
            },
        )
    finally:
        emu.stop()


@pytest.fixture
def emu(big: Big) -> Iterator[Emulator]:
    big.emu.faults.reset()
    big.emu.reset_stats()
    yield big.emu
    big.emu.faults.reset()


def method_bytes(emu: Emulator) -> dict[str, int]:
    out: dict[str, int] = {}
    for entry in emu.request_log():
        out[entry["method"]] = out.get(entry["method"], 0) + entry["bytes"]
    return out


def blobfs_stats(mnt: Path) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-m", "blobfs", "stats", str(mnt), "--json"],
        capture_output=True,
        check=True,
    ).stdout
    result: dict[str, object] = json.loads(out)
    return result


def unmount(mnt: Path, mount: harness.Mount) -> int | None:
    return mount.unmount(30)


# ---- latency hidden ------------------------------------------------------------------------


def test_listing_pages_after_the_first_are_fetched_at_once(
    big: Big, emu: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(api_module, "PER_PAGE", 100)  # 20 pages
    emu.faults.update({"latency_ms": 100})
    api = SuperviselyApi(HttpClient(emu.url, TOKEN), concurrency=8)
    began = time.monotonic()
    images = api.images(big.dataset_id)
    took = time.monotonic() - began
    assert [i.name for i in images] == sorted(big.images)  # every page, in page order
    assert emu.stats()["methods"] == {"images.list": 20}  # each page once
    assert took < 20 * 0.100 / 2, took  # one after another would take >= 2 s


def spied(api: SuperviselyApi, method: str) -> tuple[list[dict[str, Any]], list[int]]:
    """Record the payloads of ``method`` and the most requests of it in flight at once."""
    client = api.client
    post_json = client.post_json
    lock, now, most, sent = threading.Lock(), [0], [0], []

    def counted(name: str, payload: dict[str, Any]) -> Any:
        if name != method:
            return post_json(name, payload)
        with lock:
            sent.append(payload)
            now[0] += 1
            most[0] = max(most[0], now[0])
        try:
            return post_json(name, payload)
        finally:
            with lock:
                now[0] -= 1

    client.post_json = counted  # type: ignore[method-assign]
    return sent, most


def test_a_listing_whose_count_is_known_asks_for_every_page_in_one_round(
    big: Big, emu: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(api_module, "PER_PAGE", 100)
    emu.faults.update({"latency_ms": 100})
    api = SuperviselyApi(HttpClient(emu.url, TOKEN), concurrency=8)
    sent, most = spied(api, "images.list")
    [ds] = api.datasets(big.pid)
    assert ds.images_count == COUNT
    began = time.monotonic()
    images = api.images(ds.id, ds.images_count)
    took = time.monotonic() - began
    assert [i.name for i in images] == sorted(big.images)
    # pages sized so that all of them fit in one round of --concurrency requests
    assert sorted(p["page"] for p in sent) == list(range(1, 9))
    assert {p["per_page"] for p in sent} == {COUNT // 8} and most[0] == 8
    assert took < 3 * 0.100, took  # one round trip (and the serving), not two or more
    assert set(sent[0]["fields"]) >= {"id", "name", "relatedDataId", "offsetStart"}


@pytest.mark.parametrize("said", [COUNT // 3, 3 * COUNT, 1001])
def test_a_stale_count_still_lists_every_image_once_in_order(
    big: Big, emu: Emulator, said: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(api_module, "PER_PAGE", 100)
    api = SuperviselyApi(HttpClient(emu.url, TOKEN), concurrency=4)
    images = api.images(big.dataset_id, said)  # the dataset has COUNT, whatever the hint said
    assert [i.name for i in images] == sorted(big.images)


def test_a_server_that_caps_the_page_size_lower_is_followed_to_its_last_page(
    big: Big, emu: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sly_emulator import _common

    monkeypatch.setattr(_common, "MAX_PER_PAGE", 150)  # we ask for 500 a page
    api = SuperviselyApi(HttpClient(emu.url, TOKEN), concurrency=4)
    images = api.images(big.dataset_id, COUNT)
    assert [i.name for i in images] == sorted(big.images)
    assert emu.stats()["methods"] == {"images.list": -(-COUNT // 150)}


def test_failing_listing_pages_are_retried_and_a_dead_one_fails_the_listing(
    big: Big, emu: Emulator
) -> None:
    client = HttpClient(emu.url, TOKEN, retries=2, backoff_s=0.01)
    api = SuperviselyApi(client, concurrency=4)
    emu.faults.update({"scope": "images.list", "fail_n": 2, "fail_status": 503})
    assert [i.name for i in api.images(big.dataset_id, COUNT)] == sorted(big.images)
    emu.faults.update({"methods": {"images.list": "fail_status=500"}})
    began = time.monotonic()
    with pytest.raises(BlobfsError, match=r"images\.list"):
        api.images(big.dataset_id, COUNT)
    assert time.monotonic() - began < 5


def test_a_listing_page_late_past_the_deadline_times_out(big: Big, emu: Emulator) -> None:
    from blobfs import deadline

    api = SuperviselyApi(HttpClient(emu.url, TOKEN), concurrency=4)
    emu.faults.update({"methods": {"images.list": "latency_ms=1000"}})
    began = time.monotonic()
    with deadline.within(0.3), pytest.raises(BlobfsError) as info:
        api.images(big.dataset_id, COUNT)
    assert to_errno(info.value) == errno.ETIMEDOUT
    assert time.monotonic() - began < 0.9
    time.sleep(max(0.0, began + 1.3 - time.monotonic()))  # the late answers are sent


def test_the_root_listing_asks_for_meta_and_datasets_in_one_round(big: Big, emu: Emulator) -> None:
    view = remote_view(big)
    emu.faults.update({"latency_ms": 150})
    try:
        began = time.monotonic()
        assert "train" in view.readdir("/")
        took = time.monotonic() - began
        assert emu.stats()["methods"] == {"projects.meta": 1, "datasets.list": 1}
        assert took < 2 * 0.150, took
    finally:
        view.source.close()


def test_a_datasets_list_sent_ahead_that_failed_is_asked_again(big: Big, emu: Emulator) -> None:
    source = RemoteProjectSource(
        SuperviselyApi(HttpClient(emu.url, TOKEN, retries=0)),
        big.pid,
        BlockCache(1 << 16, 1 << 20),
    )
    try:
        emu.faults.update({"scope": "datasets.list", "fail_n": 1})
        source.meta_json()
        assert [d.path for d in source.datasets()] == [("train",)]
        assert emu.stats()["methods"] == {"projects.meta": 1, "datasets.list": 2}
    finally:
        source.close()


@pytest.mark.fuse
def test_through_the_mount_a_first_ls_costs_a_round_for_the_root_and_one_for_the_pages(
    tmp_path: Path, big: Big, emu: Emulator
) -> None:
    mnt = tmp_path / "mnt"
    proc = mount_remote(emu, big.pid, mnt, tmp_path / "log", "--concurrency", "4")
    try:
        emu.faults.update({"latency_ms": 200})
        emu.reset_stats()
        began = time.monotonic()
        names = os.listdir(mnt / "train" / "img")
        took = time.monotonic() - began
        assert sorted(names) == sorted(big.images)
        methods = emu.stats()["methods"]
        assert methods == {"projects.meta": 1, "datasets.list": 1, "images.list": 2}
        assert took < 4 * 0.200, took  # two rounds (and the serving), not three or more
    finally:
        emu.faults.reset()
        assert unmount(mnt, proc) == 0


@pytest.mark.fuse
def test_through_the_mount_failing_listing_pages_are_retried_or_fail_the_ls_alone(
    tmp_path: Path, big: Big, emu: Emulator
) -> None:
    for run, fault in enumerate(
        [
            {"scope": "images.list", "fail_n": 1, "fail_status": 503},
            {"methods": {"images.list": "fail_status=500"}},
        ]
    ):
        mnt = tmp_path / f"mnt{run}"
        proc = mount_remote(emu, big.pid, mnt, tmp_path / f"log{run}", "-o", "timeout=5")
        try:
            os.listdir(mnt / "train")
            emu.faults.update(fault)
            if run == 0:  # one failed page: retried, and the listing is whole
                assert sorted(os.listdir(mnt / "train" / "img")) == sorted(big.images)
                continue
            began = time.monotonic()
            with pytest.raises(OSError) as info:  # every page fails: retried to the deadline
                os.listdir(mnt / "train" / "img")
            assert info.value.errno == errno.ETIMEDOUT and time.monotonic() - began < 5 + 1.5
            emu.faults.reset()
            assert os.listdir(mnt / "train")  # the rest of the mount is fine
        finally:
            emu.faults.reset()
            assert unmount(mnt, proc) == 0


def test_a_walk_through_ann_has_its_batches_fetched_ahead(big: Big, emu: Emulator) -> None:
    source = RemoteProjectSource(
        SuperviselyApi(HttpClient(emu.url, TOKEN)), big.pid, BlockCache(1 << 16, 1 << 20)
    )
    try:
        dataset = DatasetRecord(("train",), big.dataset_id, 0)
        anns = [r for r in source.files(dataset) if r.relpath.startswith("ann/")]
        emu.faults.update({"latency_ms": 100})
        emu.reset_stats()
        began = time.monotonic()
        got = {r.relpath[4:-5]: source.content(r) for r in anns}
        took = time.monotonic() - began
        assert {k: json.loads(v) for k, v in got.items()} == {
            k: json.loads(v) for k, v in big.anns.items()
        }
        assert emu.stats()["methods"] == {"annotations.bulk.info": BATCHES}  # none twice
        assert took < BATCHES * 0.100 / 4, took  # batch after batch would take >= 4 s
    finally:
        source.close()


def test_a_walk_that_asks_for_each_file_twice_keeps_its_read_ahead(
    big: Big, emu: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The mount asks for an unsized ann file's content twice (its size, then its bytes):
    that must not start the walk over, which made every read rescan the batches ahead."""
    from blobfs.sources import remote_anns

    checks = [0]
    known = remote_anns.AnnotationCache._known

    def counted(self: remote_anns.AnnotationCache, image_id: int) -> bool:
        checks[0] += 1
        return known(self, image_id)

    monkeypatch.setattr(remote_anns.AnnotationCache, "_known", counted)
    source = RemoteProjectSource(
        SuperviselyApi(HttpClient(emu.url, TOKEN)), big.pid, BlockCache(1 << 16, 1 << 20)
    )
    try:
        dataset = DatasetRecord(("train",), big.dataset_id, 0)
        anns = [r for r in source.files(dataset) if r.relpath.startswith("ann/")]
        got = {}
        for r in anns:
            source.content(r)
            got[r.relpath[4:-5]] = source.content(r)
        assert {k: json.loads(v) for k, v in got.items()} == {
            k: json.loads(v) for k, v in big.anns.items()
        }
        assert emu.stats()["methods"]["annotations.bulk.info"] == BATCHES  # none twice
        assert checks[0] < 10 * 2 * COUNT, checks[0]  # ~1,500 per read before
    finally:
        source.close()


def test_annotations_read_out_of_order_fetch_only_their_own_batches(
    big: Big, emu: Emulator
) -> None:
    source = RemoteProjectSource(
        SuperviselyApi(HttpClient(emu.url, TOKEN)), big.pid, BlockCache(1 << 16, 1 << 20)
    )
    try:
        dataset = DatasetRecord(("train",), big.dataset_id, 0)
        anns = [r for r in source.files(dataset) if r.relpath.startswith("ann/")]
        emu.reset_stats()
        for at in (1500, 200, 900, 50, 1300):
            assert isinstance(anns[at].ref, AnnRef) and anns[at].ref.position == at
            source.content(anns[at])
        time.sleep(0.2)  # nothing is still on its way in the background
        assert emu.stats()["methods"] == {"annotations.bulk.info": 5}
    finally:
        source.close()


# ---- ann/ listed with its sizes ------------------------------------------------------------


def remote_view(big: Big, concurrency: int = 8) -> ProjectView:
    api = SuperviselyApi(HttpClient(big.emu.url, TOKEN), concurrency=concurrency)
    return ProjectView(RemoteProjectSource(api, big.pid, BlockCache(1 << 16, 1 << 20)))


def test_listing_ann_gives_every_file_its_true_size_and_reading_then_asks_nothing(
    big: Big, emu: Emulator
) -> None:
    view = remote_view(big)
    try:
        listed = dict(view.readdir_attrs("/train/ann"))
        assert emu.stats()["methods"] == {
            "projects.meta": 1,
            "datasets.list": 1,
            "images.list": 2,  # one listing for img/ and ann/ (pages of 1,000)
            "annotations.bulk.info": BATCHES,
        }
        assert sorted(listed) == sorted(f"{n}.json" for n in big.images)
        emu.reset_stats()
        for name, attrs in listed.items():
            data = view.read_path(f"/train/ann/{name}", 0, 1 << 20)
            assert attrs is not None and attrs["st_size"] == len(data), name
            assert json.loads(data) == json.loads(big.anns[name[:-5]]), name
        view.readdir("/train/img")  # the same images.list answer
        assert emu.stats()["requests"] == 0
    finally:
        view.source.close()


def test_the_ann_listing_keeps_at_most_twice_concurrency_batches_of_50_in_flight(
    big: Big, emu: Emulator
) -> None:
    view = remote_view(big, concurrency=3)
    sent, most = spied(view.source.api, "annotations.bulk.info")  # type: ignore[attr-defined]
    emu.faults.update({"latency_ms": 50})
    try:
        began = time.monotonic()
        listed = dict(view.readdir_attrs("/train/ann"))
        took = time.monotonic() - began
        assert all(attrs is not None for attrs in listed.values())
        assert most[0] == 6  # concurrent, and never more than twice --concurrency
        assert took >= BATCHES / 6 * 0.050  # 40 batches, 6 at a time
        assert {len(p["imageIds"]) for p in sent} == {ANN_BATCH}  # the SDK's batch
        assert emu.stats()["methods"]["annotations.bulk.info"] == BATCHES  # each once
    finally:
        view.source.close()


def test_annotations_go_up_in_the_sdks_batches_and_come_back_the_same(
    big: Big, emu: Emulator
) -> None:
    api = SuperviselyWriteApi(HttpClient(emu.url, TOKEN), concurrency=4)
    ids = [img.id for img in api.images(big.dataset_id)][:120]
    before = api.annotations(big.dataset_id, ids)
    sent, _ = spied(api, "annotations.bulk.add")
    api.add_annotations(big.dataset_id, [(i, before[i]) for i in ids])
    assert [len(p["annotations"]) for p in sent] == [ANN_ADD_BATCH, ANN_ADD_BATCH, 20]
    assert api.annotations(big.dataset_id, ids) == before


def test_a_failing_ann_batch_fails_only_its_own_files(big: Big, emu: Emulator) -> None:
    view = remote_view(big)
    try:
        view.readdir("/train/img")
        emu.faults.update({"fail_n": 1, "fail_status": 400, "scope": "annotations.bulk.info"})
        listed = dict(view.readdir_attrs("/train/ann"))
        unsized = sorted(name for name, attrs in listed.items() if attrs is None)
        assert len(unsized) == ANN_BATCH  # the one batch that failed; the others are sized
        emu.faults.update({"fail_n": 1})  # still failing when one of its files is read
        with pytest.raises(BlobfsError) as info:
            view.read_path(f"/train/ann/{unsized[0]}", 0, 1 << 20)
        assert to_errno(info.value) == errno.EIO
        sized = next(name for name, attrs in listed.items() if attrs is not None)
        assert json.loads(view.read_path(f"/train/ann/{sized}", 0, 1 << 20)) is not None
        for name in unsized:  # the server answers again: its files read (asked again)
            data = view.read_path(f"/train/ann/{name}", 0, 1 << 20)
            assert json.loads(data) == json.loads(big.anns[name[:-5]]), name
            assert view.getattr(f"/train/ann/{name}")["st_size"] == len(data)
    finally:
        view.source.close()


@pytest.mark.fuse
@pytest.mark.parametrize("sized", [True, False], ids=["listed-with-sizes", "listed-without"])
def test_reading_a_listed_ann_folder_asks_for_each_batch_at_most_once(
    tmp_path: Path, big: Big, emu: Emulator, sized: bool
) -> None:
    """Listed with their sizes (the batches came with the listing), reading the files asks
    nothing; listed without (every batch failed then), a walk reads each batch once."""
    mnt = tmp_path / "mnt"
    proc = mount_remote(emu, big.pid, mnt, tmp_path / "log")
    try:
        ann = mnt / "train" / "ann"
        if not sized:
            emu.faults.update({"methods": {"annotations.bulk.info": "fail_status=400"}})
        names = os.listdir(ann)
        emu.faults.reset()
        before = blobfs_stats(mnt)["fuse_ops"]
        emu.reset_stats()
        began = time.monotonic()
        got = {n: (ann / n).read_bytes() for n in names}
        took = time.monotonic() - began
        after = blobfs_stats(mnt)["fuse_ops"]
        assert {n: json.loads(v) for n, v in got.items()} == {
            f"{n}.json": json.loads(v) for n, v in big.anns.items()
        }
        methods = emu.stats()["methods"]
        assert methods == ({} if sized else {"annotations.bulk.info": BATCHES})
        assert isinstance(before, dict) and isinstance(after, dict)
        getattrs = after.get("getattr", 0) - before.get("getattr", 0)
        if sized:
            assert getattrs < 10, getattrs  # the kernel has every size from the listing
        assert took < 10, took  # a walk: the batches ahead are read ahead, not rescanned
    finally:
        assert unmount(mnt, proc) == 0


def test_a_listed_ann_page_offers_the_content_a_read_of_each_file_answers(
    big: Big, emu: Emulator
) -> None:
    view = remote_view(big)
    try:
        runs = [r for r in view.readdir_runs("/train/ann") if isinstance(r, ListingRun)]
        offered = {
            name: data
            for run in runs
            for name, data in zip(run.names, run.contents or [None] * len(run.names), strict=True)
        }
        assert sorted(offered) == sorted(f"{n}.json".encode() for n in big.images)
        for name, data in offered.items():
            assert data == view.read_path(f"/train/ann/{name.decode()}", 0, 1 << 20), name
        img = [r for r in view.readdir_runs("/train/img") if isinstance(r, ListingRun)]
        assert img and all(run.contents is None for run in img)  # ranges of a blob: none
    finally:
        view.source.close()


def settled_push(mnt: Path, timeout_s: float = 60) -> dict[str, int]:
    """The daemon's request counts once every file queued for the push was dealt with."""
    deadline_at = time.monotonic() + timeout_s
    while True:
        ops: dict[str, int] = blobfs_stats(mnt)["fuse_ops"]  # type: ignore[assignment]
        dealt = sum(ops.get(k, 0) for k in ("push", "push_skipped", "push_stale"))
        if dealt == ops.get("push_queued", -1):
            return ops
        assert time.monotonic() < deadline_at, ops
        time.sleep(0.05)


@pytest.mark.fuse
@pytest.mark.parametrize("expired", [False, True], ids=["at-once", "after-the-attr-timeout"])
def test_through_the_mount_a_listed_ann_folder_reads_without_a_read_request(
    tmp_path: Path, big: Big, emu: Emulator, expired: bool
) -> None:
    """Its files' content went to the kernel with the listing: once the push has settled,
    reading them sends the daemon (nearly) nothing, and they hold the same bytes as when
    read from the daemon. Read after the attributes timed out, too: the kernel asks for
    them again and gets the listing's, so it keeps the pushed pages.

    Nearly: in loaded suites a few files (well under 1%) were seen read from the daemon
    although every one was stored; why the kernel dropped or missed their pages is not
    known (not the attribute timeout, nor attributes that differ between listing and
    getattr). A READ answers the same bytes, so only the request count is at stake.
    """
    mnt = tmp_path / "mnt"
    timeout = ("-o", "attr_timeout=1") if expired else ()
    proc = mount_remote(emu, big.pid, mnt, tmp_path / "log", *timeout)
    try:
        ann = mnt / "train" / "ann"
        names = os.listdir(ann)  # every page was queued for the push before it went out
        before = settled_push(mnt)
        assert before["push"] >= COUNT  # a page re-read at a getdents boundary: pushed again
        assert "push_skipped" not in before and "push_stale" not in before
        if expired:
            time.sleep(1.5)
        got = {n: (ann / n).read_bytes() for n in names}
        after = blobfs_stats(mnt)["fuse_ops"]
        assert isinstance(after, dict)
        reads = after["read"] - before.get("read", 0) - 1  # less the stats file's own
        assert reads <= COUNT // 100, reads
        if expired:
            assert after["getattr"] - before["getattr"] >= COUNT  # asked again, pages kept
        view = remote_view(big)
        try:
            assert got == {n: view.read_path(f"/train/ann/{n}", 0, 1 << 20) for n in names}
        finally:
            view.source.close()
    finally:
        assert unmount(mnt, proc) == 0


@pytest.mark.fuse
def test_through_the_mount_a_failed_ann_batch_fails_only_a_read_that_fails_again(
    tmp_path: Path, big: Big, emu: Emulator
) -> None:
    mnt = tmp_path / "mnt"
    proc = mount_remote(emu, big.pid, mnt, tmp_path / "log")
    try:
        ann = mnt / "train" / "ann"
        os.listdir(mnt / "train" / "img")
        emu.faults.update({"fail_n": 1, "fail_status": 400, "scope": "annotations.bulk.info"})
        names = sorted(os.listdir(ann))  # one batch failed: its files are listed unsized
        assert len(names) == COUNT
        emu.faults.update({"fail_n": 1})  # and fails once more, for the first read asking
        failed = []
        for name in names:
            try:
                data = (ann / name).read_bytes()
            except OSError as exc:
                failed.append((name, exc.errno))
                continue
            assert json.loads(data) == json.loads(big.anns[name[:-5]]), name
        assert len(failed) == 1 and failed[0][1] == errno.EIO, failed
        assert json.loads((ann / failed[0][0]).read_bytes()) is not None  # asked again
    finally:
        assert unmount(mnt, proc) == 0
    assert "HTTP 400" in (tmp_path / "log").read_text()


# ---- bytes sized by the access pattern ---------------------------------------------------


def test_a_shuffled_read_fetches_at_most_twice_what_it_delivers(
    tmp_path: Path, big: Big, emu: Emulator
) -> None:
    mnt = tmp_path / "mnt"
    proc = mount_remote(emu, big.pid, mnt, tmp_path / "log")
    try:
        img = mnt / "train" / "img"
        os.listdir(img)
        emu.reset_stats()
        names = random.Random(7).sample(sorted(big.images), 300)
        wrong = [n for n in names if (img / n).read_bytes() != big.images[n]]
        delivered = sum(len(big.images[n]) for n in names)
        fetched = method_bytes(emu).get("images.data.download", 0)
        assert wrong == []
        assert fetched <= 2 * delivered, (fetched, delivered)
        assert blobfs_stats(mnt)["random_reads"] >= 250  # type: ignore[operator]
    finally:
        assert unmount(mnt, proc) == 0


def test_a_scan_in_blob_order_still_reads_in_few_large_requests(
    tmp_path: Path, big: Big, emu: Emulator
) -> None:
    mnt = tmp_path / "mnt"
    proc = mount_remote(emu, big.pid, mnt, tmp_path / "log")
    try:
        img = mnt / "train" / "img"
        os.listdir(img)
        emu.reset_stats()
        assert [n for n in sorted(big.images) if (img / n).read_bytes() != big.images[n]] == []
        requests = emu.stats()["methods"].get("images.data.download", 0)
        fetched = method_bytes(emu).get("images.data.download", 0)
        assert requests <= big.blob_size // (1 << 20) + 8, requests
        assert fetched <= big.blob_size + (1 << 20), (fetched, big.blob_size)
    finally:
        assert unmount(mnt, proc) == 0


# ---- the Range fallback --------------------------------------------------------------------


def random_reads(mnt: Path, big: Big, n: int = 20, seed: int = 3) -> list[str]:
    img = mnt / "train" / "img"
    names = random.Random(seed).sample(sorted(big.images), n)
    return [name for name in names if (img / name).read_bytes() != big.images[name]]


def test_a_blob_download_that_ignores_range_switches_to_ranged_team_files_reads(
    tmp_path: Path, big: Big, emu: Emulator
) -> None:
    emu.faults.update({"methods": {"images.data.download": "ignore_range"}})
    mnt = tmp_path / "mnt"
    proc = mount_remote(emu, big.pid, mnt, tmp_path / "log")
    try:
        os.listdir(mnt / "train" / "img")
        emu.reset_stats()
        assert random_reads(mnt, big) == []
        sent = method_bytes(emu)
        methods = emu.stats()["methods"]
        assert methods.get("images.data.download", 0) == 1  # the answer that showed it
        assert methods.get("file-storage.download", 0) >= 19
        assert sent.get("file-storage.download", 0) < 40 * 1024  # 20 images, not blobs
        assert sum(sent.values()) < big.blob_size + 40 * 1024  # was ~10x the blob
        stats = blobfs_stats(mnt)
        assert stats["range_fallback_blobs"] == {"file_storage": 1, "whole_download": 0}
    finally:
        assert unmount(mnt, proc) == 0
    assert "ignores Range" in (tmp_path / "log").read_text()


@pytest.mark.parametrize("team_files", ["ignore_range", "fail_status=404"])
def test_when_team_files_cannot_range_either_the_blob_is_downloaded_once(
    team_files: str, tmp_path: Path, big: Big, emu: Emulator
) -> None:
    emu.faults.update(
        {
            "methods": {
                "images.data.download": "ignore_range",
                "file-storage.download": team_files,
            }
        }
    )
    mnt = tmp_path / "mnt"
    proc = mount_remote(emu, big.pid, mnt, tmp_path / "log", "--cache-dir", str(tmp_path / "c"))
    try:
        os.listdir(mnt / "train" / "img")
        emu.reset_stats()
        assert random_reads(mnt, big) == []
        assert random_reads(mnt, big, 50, seed=4) == []
        whole = [
            e
            for e in emu.request_log()
            if e["method"] == "images.data.download" and e["range"] is None
        ]
        assert len(whole) == 1 and whole[0]["bytes"] == big.blob_size
        assert emu.stats()["methods"].get("file-storage.download", 0) == 1
        # the two answers that ignored Range may each reach the socket whole before the
        # client hangs up on them, then the one download: three blobs and a few small
        # answers at most (it was ~10 blobs before the fallback chain)
        assert sum(method_bytes(emu).values()) <= 3 * big.blob_size + 16 * 1024
        stats = blobfs_stats(mnt)
        assert stats["range_fallback_blobs"] == {"file_storage": 0, "whole_download": 1}
    finally:
        assert unmount(mnt, proc) == 0


# ---- --prefetch ----------------------------------------------------------------------------


def test_prefetch_warms_the_project_so_an_epoch_makes_no_request(
    tmp_path: Path, big: Big, emu: Emulator
) -> None:
    mnt = tmp_path / "mnt"
    proc = mount_remote(
        emu, big.pid, mnt, tmp_path / "log", "-o", "prefetch", "--cache-dir", str(tmp_path / "c")
    )
    try:
        deadline = time.monotonic() + 60
        progress: dict[str, object] = {}
        while time.monotonic() < deadline:
            found = blobfs_stats(mnt).get("prefetch")
            assert isinstance(found, dict)
            progress = found
            if progress["state"] != "running" and progress["state"] != "waiting":
                break
            time.sleep(0.1)
        assert progress["state"] == "done", progress
        assert progress["anns_done"] == progress["anns"] == COUNT
        assert progress["blob_bytes_done"] == progress["blob_bytes"] == big.blob_size
        img, ann = mnt / "train" / "img", mnt / "train" / "ann"
        names = os.listdir(img)  # the view's own listing
        os.listdir(ann)
        emu.reset_stats()
        random.Random(5).shuffle(names)
        assert [n for n in names if (img / n).read_bytes() != big.images[n]] == []
        assert [n for n in names if json.loads((ann / f"{n}.json").read_bytes()) is None] == []
        assert emu.stats()["requests"] == 0
    finally:
        assert unmount(mnt, proc) == 0


# ---- the read pattern, in process --------------------------------------------------------


def test_the_read_pattern_tells_random_reads_from_walks_per_reader() -> None:
    kib = 1024
    rp = ReadPattern(block_size=256 * kib, max_window=1024 * kib)
    size = 100_000 * kib
    # a random read of one image fetches just that image
    plan = rp.plan("b", 50_000 * kib, 50_000 * kib + 400, 50_000 * kib, 50_000 * kib + 400, size)
    assert not plan.blocks and plan.fetch_end == 50_000 * kib + 400
    # two readers walking the same blob from two places are both seen as walks
    a, b = 10_000 * kib, 70_000 * kib
    for step in range(8):
        for base in (a, b):
            lo = base + step * 1024
            plan = rp.plan("b", lo, lo + 400, lo, lo + 400, size)
    assert plan.blocks and plan.prefetch_end > lo + 400  # grown into block readahead
    assert rp.random_reads == 3  # the lone read and the first read of each walk
    # a big image read in pieces never pulls the bytes after it
    m0, m1 = 30_000 * kib, 30_000 * kib + 3000 * kib
    for off in range(m0, m1, 128 * kib):
        plan = rp.plan("b", off, min(off + 128 * kib, m1), m0, m1, size)
        assert not plan.blocks and plan.fetch_end <= m1


def test_spans_are_served_while_cached_and_forgotten_when_evicted() -> None:
    data = bytes(range(256)) * 64  # 16 KiB
    cache = BlockCache(block_size=4096, max_bytes=4096)
    blob = CachedBlob("b", "v1", len(data), BytesReader(data))
    assert cache.read_span(blob, 100, 500, 1000) == data[100:500]
    assert cache.read_span(blob, 600, 1000, 1000) == data[600:1000]  # inside the span
    assert (cache.stats.span_fetches, cache.stats.fetched_bytes) == (1, 900)
    for start in range(2000, 14000, 1000):  # fill the 4 KiB budget many times over
        assert cache.read_span(blob, start, start + 900, start + 900) == data[start : start + 900]
    assert cache.used_bytes <= 4096
    assert cache.read_span(blob, 100, 500, 500) == data[100:500]  # evicted: fetched again
    assert cache.stats.span_fetches == 14
    assert cache.read(blob, 0, 4096) == data[:4096]  # blocks and spans live side by side
    assert cache.cached(blob, 10, 20) == data[10:20]


def test_a_bad_concurrency_is_refused_before_mounting(tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "blobfs",
            "mount",
            "sly://1",
            str(tmp_path / "mnt"),
            "-o",
            "concurrency=0",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1
    assert "concurrency must be 1..16" in done.stderr
    assert "Traceback" not in done.stderr
