"""SuperviselyApi: the REST calls blobfs makes, turned into plain records.

Payloads follow the SDK 6.74.51 (``api/*_api.py``); ``docs/formats.md`` lists each call.
No caching here (the remote source and view own that), and nothing SDK is imported.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, NamedTuple

from blobfs import deadline
from blobfs.errors import RemoteError
from blobfs.transport.http import HttpClient, HttpRangeReader, UploadContent
from blobfs.transport.ranged import BlobReader, StrictRangeReader, WholeBlob

logger = logging.getLogger(__name__)

PER_PAGE = 1000
#: Largest page asked for when the count is known (the server may cap it lower: its first
#: answer's ``pagesCount`` then says how many pages there really are).
PER_PAGE_MAX = 10_000
#: The ``images.list`` fields a mount reads (the server sends ~30 per image otherwise).
IMAGE_FIELDS = (
    "id",
    "name",
    "size",
    "updatedAt",
    "hash",
    "relatedDataId",
    "downloadId",
    "offsetStart",
    "offsetEnd",
)
#: Image ids per ``annotations.bulk.info`` request: the SDK's default, half the server's cap
#: of 100. From about 60 ids up the server returns the tags inside an object in no stable
#: order, so the same request can answer different bytes; a file fetched again (after an
#: eviction, or by another mount) would then change its bytes under the same size.
ANN_BATCH = 50
#: Annotations per ``annotations.bulk.add`` request (the SDK's upload batch).
ANN_ADD_BATCH = 50
#: A listing that claims more pages than this is refused, not followed.
MAX_PAGES = 100_000
#: Requests in flight at once for one listing, annotation walk or prefetch.
DEFAULT_CONCURRENCY = 16
#: Most ``annotations.bulk.info`` batches in flight at once, whatever ``concurrency`` says.
ANN_CONCURRENCY_MAX = 32


def ann_concurrency(concurrency: int) -> int:
    """Annotation batches in flight for a mount of ``concurrency``: twice as many as other
    requests, since a batch holds half the ids the server would take (``ANN_BATCH``) and
    reading ``ann/`` is round trips of batches; bounded so that they and the readahead
    fit in the HTTP pool a mount sizes for both (:func:`pool_size`)."""
    return max(1, min(ANN_CONCURRENCY_MAX, 2 * concurrency))


def pool_size(concurrency: int) -> int:
    """HTTP connections a mount keeps: readahead or a listing (``concurrency``) and an
    annotation walk (:func:`ann_concurrency`) at the same time."""
    return max(1, concurrency) + ann_concurrency(concurrency)


@dataclass(frozen=True, slots=True)
class RemoteDataset:
    """A dataset as ``datasets.list`` describes it."""

    id: int
    name: str
    parent_id: int | None
    updated_at: str
    #: How many images the server says it has (``imagesCount``; None when it does not say):
    #: a listing asks for all its pages at once instead of waiting for the first.
    images_count: int | None = None


class RemoteImage(NamedTuple):
    """The fields of an image info the mount needs (blob fields None for plain images).

    A named tuple, not a frozen dataclass: a listing holds one per image, and a tuple of
    plain values is cheap to build and left alone by the cyclic garbage collector, which
    otherwise walks every one of them on each full collection.
    """

    id: int
    name: str
    size: int
    updated_at: str
    hash: str | None
    related_data_id: int | None
    download_id: str | None
    offset_start: int | None
    offset_end: int | None

    @property
    def in_blob(self) -> bool:
        return self.related_data_id is not None and self.offset_start is not None


@dataclass(frozen=True, slots=True)
class RemoteFile:
    """A Team Files entry (``file-storage.info``)."""

    id: int
    size: int
    version: str
    team_id: int | None = None
    path: str | None = None


def _until() -> float | None:
    """This thread's deadline as a ``time.monotonic()`` instant (None without one)."""
    left = deadline.remaining()
    return None if left is None else time.monotonic() + left


def _result(future: Future[dict[str, Any]], method: str) -> dict[str, Any]:
    """A page's answer, waited for no longer than the caller's deadline."""
    left = deadline.remaining()
    try:
        return future.result(None if left is None else max(left, 0.0))
    except FutureTimeout:
        raise deadline.expired(method, "a listing page is late") from None


def _pages_count(method: str, first: dict[str, Any]) -> int:
    pages = first.get("pagesCount", 1)
    if not isinstance(pages, int) or isinstance(pages, bool) or pages < 0 or pages > MAX_PAGES:
        raise RemoteError(f"{method}: implausible pagesCount {pages!r}")
    return pages


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RemoteError(f"server sent {what}={value!r}, not an integer")
    return value


def _count(value: Any) -> int | None:
    """A count the server gives as a hint: a plausible integer, or None."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def _opt_int(value: Any, what: str) -> int | None:
    return None if value is None else _int(value, what)


def _str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise RemoteError(f"server sent {what} of type {type(value).__name__}, not a string")
    return value


def parse_image(item: Any) -> RemoteImage:
    """One ``images.list`` entity -> RemoteImage; raises RemoteError on missing/odd fields.

    Well-formed entities take a path of plain type tests (a first listing of a large
    dataset parses every one of them); anything else goes through the field-by-field
    checks, which say what is wrong.
    """
    if type(item) is dict:
        get = item.get
        id_, name, size, rel = get("id"), get("name"), get("size") or 0, get("relatedDataId")
        start, end, download, stamp = (
            get("offsetStart"),
            get("offsetEnd"),
            get("downloadId"),
            get("updatedAt"),
        )
        digest = get("hash")
        if (
            type(id_) is int
            and type(name) is str
            and type(size) is int
            and (rel is None or type(rel) is int)
            and (start is None or type(start) is int)
            and (end is None or type(end) is int)
            and (download is None or type(download) is str)
            and type(stamp) is str
        ):
            return RemoteImage(
                id_,
                name,
                size,
                stamp,
                digest if type(digest) is str else None,
                rel,
                download,
                start,
                end,
            )
    return _parse_image_checked(item)


def _parse_image_checked(item: Any) -> RemoteImage:
    if not isinstance(item, dict):
        raise RemoteError("image info is not an object")
    try:
        return RemoteImage(
            id=_int(item["id"], "id"),
            name=_str(item["name"], "name"),
            size=_int(item.get("size") or 0, "size"),
            updated_at=str(item.get("updatedAt") or ""),
            hash=item.get("hash") if isinstance(item.get("hash"), str) else None,
            related_data_id=_opt_int(item.get("relatedDataId"), "relatedDataId"),
            download_id=(str(item["downloadId"]) if item.get("downloadId") is not None else None),
            offset_start=_opt_int(item.get("offsetStart"), "offsetStart"),
            offset_end=_opt_int(item.get("offsetEnd"), "offsetEnd"),
        )
    except KeyError as exc:
        raise RemoteError(f"image info lacks {exc}") from None


class SuperviselyApi:
    """The subset of the public API a read-only mount uses."""

    def __init__(self, client: HttpClient, concurrency: int = DEFAULT_CONCURRENCY) -> None:
        self.client = client
        #: Most requests one listing or prefetch keeps in flight at once.
        self.concurrency = max(1, concurrency)
        #: Most annotation batches in flight at once.
        self.ann_concurrency = ann_concurrency(self.concurrency)

    def _pages(
        self, method: str, payload: dict[str, Any], expected: int | None = None
    ) -> Iterator[Any]:
        """Every entity of a paged listing, in page order.

        Pages are asked for at once, at most ``concurrency`` at a time. When the count is
        known beforehand (``expected``, from the parent's info), every page goes out at
        once, sized so that they all fit in one round of ``concurrency`` requests: a
        listing costs about one round trip, not one per page. Otherwise the first page
        says how many there are and the rest follow it. The first page's ``pagesCount``
        is the truth either way: pages beyond it are dropped, missing ones asked for
        then. Each page has the client's own retries and the caller's deadline.
        """
        per_page, guess = PER_PAGE, 1
        if expected is not None and expected > PER_PAGE and self.concurrency > 1:
            per_page = min(PER_PAGE_MAX, max(PER_PAGE, -(-expected // self.concurrency)))
            guess = min(MAX_PAGES, -(-expected // per_page))
        if guess > 1:
            yield from self._pages_known(method, payload, per_page, guess)
            return
        first = self._page(method, payload, 1, per_page)
        pages = _pages_count(method, first)
        yield from first["entities"]
        if pages <= 1:
            return
        if self.concurrency <= 1 or pages == 2:
            for page in range(2, pages + 1):
                yield from self._page(method, payload, page, per_page)["entities"]
            return
        with ThreadPoolExecutor(
            min(self.concurrency, pages - 1), thread_name_prefix="blobfs-pages"
        ) as pool:
            until = _until()
            futures = [
                pool.submit(self._page_within, until, method, payload, p, per_page)
                for p in range(2, pages + 1)
            ]
            try:
                for future in futures:
                    yield from _result(future, method)["entities"]
            finally:
                for future in futures:
                    future.cancel()

    def _pages_known(
        self, method: str, payload: dict[str, Any], per_page: int, guess: int
    ) -> Iterator[Any]:
        """Pages 1..``guess`` at once, then any the first page says exist beyond them."""
        with ThreadPoolExecutor(
            min(self.concurrency, guess), thread_name_prefix="blobfs-pages"
        ) as pool:
            until = _until()

            def ask(page: int) -> Future[dict[str, Any]]:
                return pool.submit(self._page_within, until, method, payload, page, per_page)

            futures = [ask(p) for p in range(1, guess + 1)]
            try:
                first = _result(futures[0], method)
                pages = _pages_count(method, first)
                for future in futures[pages:]:  # the count was stale: fewer pages now
                    future.cancel()
                yield from first["entities"]
                for future in futures[1:pages]:
                    yield from _result(future, method)["entities"]
                futures += [ask(p) for p in range(guess + 1, pages + 1)]  # more than said
                for future in futures[guess:]:
                    yield from _result(future, method)["entities"]
            finally:
                for future in futures:
                    future.cancel()

    def _page_within(
        self, until: float | None, method: str, payload: dict[str, Any], page: int, per_page: int
    ) -> dict[str, Any]:
        """:meth:`_page` in a pool thread, under the deadline of the thread that asked (a
        page that waited its turn in the pool gets what is left of it, not a new one)."""
        left = None if until is None else max(until - time.monotonic(), 1e-3)
        with deadline.within(left):
            return self._page(method, payload, page, per_page)

    def _page(
        self, method: str, payload: dict[str, Any], page: int, per_page: int = PER_PAGE
    ) -> dict[str, Any]:
        answer = self.client.post_json(method, {**payload, "page": page, "per_page": per_page})
        if not isinstance(answer, dict) or not isinstance(answer.get("entities"), list):
            raise RemoteError(f"{method}: answer has no entity list")
        return answer

    def project_info(self, project_id: int) -> dict[str, Any]:
        answer = self.client.post_json("projects.info", {"id": project_id})
        if not isinstance(answer, dict):
            raise RemoteError("projects.info: answer is not an object")
        return answer

    def project_meta(self, project_id: int) -> dict[str, Any]:
        answer = self.client.post_json("projects.meta", {"id": project_id})
        if not isinstance(answer, dict):
            raise RemoteError("projects.meta: answer is not an object")
        return answer

    def datasets(self, project_id: int) -> list[RemoteDataset]:
        out = []
        for item in self._pages(
            "datasets.list", {"projectId": project_id, "filter": [], "recursive": True}
        ):
            if not isinstance(item, dict):
                raise RemoteError("datasets.list: entity is not an object")
            out.append(
                RemoteDataset(
                    _int(item.get("id"), "id"),
                    _str(item.get("name"), "name"),
                    _opt_int(item.get("parentId"), "parentId"),
                    str(item.get("updatedAt") or ""),
                    _count(item.get("imagesCount")),
                )
            )
        return out

    def images(self, dataset_id: int, expected: int | None = None) -> list[RemoteImage]:
        """Every image of a dataset, in id order (``expected``: how many its info said)."""
        payload = {
            "datasetId": dataset_id,
            "filter": [],
            "sort": "id",
            "sort_order": "asc",
            "fields": list(IMAGE_FIELDS),
        }
        return [parse_image(item) for item in self._pages("images.list", payload, expected)]

    def annotations(self, dataset_id: int, image_ids: Sequence[int]) -> dict[int, Any]:
        """image id -> annotation JSON, fetched ``ANN_BATCH`` at a time (batches at once,
        at most ``ann_concurrency`` in flight)."""
        batches = [list(image_ids[i : i + ANN_BATCH]) for i in range(0, len(image_ids), ANN_BATCH)]
        out: dict[int, Any] = {}
        if len(batches) <= 1 or self.ann_concurrency <= 1:
            for batch in batches:
                out.update(self._ann_batch(dataset_id, batch))
            return out
        with ThreadPoolExecutor(
            min(self.ann_concurrency, len(batches)), thread_name_prefix="blobfs-anns"
        ) as pool:
            for part in pool.map(lambda b: self._ann_batch(dataset_id, b), batches):
                out.update(part)
        return out

    def _ann_batch(self, dataset_id: int, batch: list[int]) -> dict[int, Any]:
        answer = self.client.post_json(
            "annotations.bulk.info",
            {
                "datasetId": dataset_id,
                "imageIds": batch,
                "withCustomData": False,
                "forceMetadataForLinks": False,
                "integerCoords": False,
            },
        )
        if not isinstance(answer, list):
            raise RemoteError("annotations.bulk.info: answer is not a list")
        out: dict[int, Any] = {}
        for item in answer:
            if isinstance(item, dict) and isinstance(item.get("annotation"), dict):
                out[_int(item.get("imageId"), "imageId")] = item["annotation"]
        return out

    def file_info(self, file_id: int) -> RemoteFile:
        answer = self.client.post_json("file-storage.info", {"id": file_id})
        if not isinstance(answer, dict):
            raise RemoteError("file-storage.info: answer is not an object")
        # The SDK's FileInfo.sizeb is ``meta.size`` (ApiField.SIZEB2); older answers had ``size``.
        meta = answer.get("meta")
        found = meta.get("size") if isinstance(meta, dict) else None
        size = _int(found if found is not None else answer.get("size"), "size")
        version = f"{answer.get('hash') or ''}:{answer.get('updatedAt') or ''}:{size}"
        team, path = answer.get("teamId"), answer.get("path")
        return RemoteFile(
            _int(answer.get("id", file_id), "id"),
            size,
            version,
            team if isinstance(team, int) and not isinstance(team, bool) else None,
            path if isinstance(path, str) and path.startswith("/") else None,
        )

    def blob_reader(
        self,
        project_id: int,
        download_id: str,
        size: int,
        file: RemoteFile | None = None,
        spill_dir: str | None = None,
    ) -> BlobReader:
        """Ranged reads of a whole blob through ``images.data.download``, falling back to
        ``file-storage.download`` (when ``file`` says its team and path) and then to one
        whole download if the server ignores ``Range`` (see :mod:`blobfs.transport.ranged`)."""
        name = f"blob {download_id}"
        payload = {"projectId": project_id, "downloadId": download_id}
        primary = StrictRangeReader(self.client, "images.data.download", payload, size, name)
        secondary = None
        if file is not None and file.team_id is not None and file.path is not None:
            secondary = StrictRangeReader(
                self.client,
                "file-storage.download",
                {"teamId": file.team_id, "path": file.path},
                size,
                name,
            )
        whole = WholeBlob(self.client, "images.data.download", payload, size, name, spill_dir)
        return BlobReader(primary, secondary, whole)

    def image_reader(self, image_id: int, size: int) -> HttpRangeReader:
        """Ranged reads of one ordinary image of ``size`` bytes through ``images.download``."""
        return HttpRangeReader(
            self.client, "images.download", {"id": image_id}, size, f"image {image_id}"
        )


class SuperviselyWriteApi(SuperviselyApi):
    """The calls writeback makes on top of the read-only ones (SDK payloads, 6.74.51)."""

    def create_dataset(self, project_id: int, name: str, parent_id: int | None) -> int:
        answer = self.client.post_json(
            "datasets.add",
            {"projectId": project_id, "name": name, "description": "", "parentId": parent_id},
        )
        return _int(answer.get("id") if isinstance(answer, dict) else None, "id")

    def update_meta(self, project_id: int, meta: dict[str, Any]) -> None:
        self.client.post_json("projects.meta.update", {"id": project_id, "meta": meta})

    def mark_blob_project(self, project_id: int) -> None:
        """Set the custom-data flag ``upload_by_offsets`` sets (``is_blob_project``)."""
        info = self.project_info(project_id)
        found = info.get("customData")
        custom: dict[str, Any] = found if isinstance(found, dict) else {}
        if not custom.get("is_blob_project"):
            self.client.post_json(
                "projects.editInfo",
                {
                    "id": project_id,
                    "customData": {**custom, "is_blob_project": True},
                    "silent": True,
                },
            )

    def upload_team_file(
        self, team_id: int, remote_dir: str, name: str, source: str | UploadContent
    ) -> int:
        """Upload a local file (a path, or bytes made as they are sent) to Team Files
        (``file-storage.upload``); returns its id."""
        answer = self.client.post_multipart(
            f"file-storage.upload?teamId={team_id}",
            {"path": remote_dir, "name": name},
            ("file", name, source),
        )
        if isinstance(answer, list) and answer:
            answer = answer[0]
        return _int(answer.get("id") if isinstance(answer, dict) else None, "id")

    def add_blob_images(
        self, dataset_id: int, team_file_id: int, items: Sequence[tuple[str, int, int]]
    ) -> dict[str, int]:
        """Register ``(name, start, end)`` ranges of a Team Files blob; name -> image id."""
        out: dict[str, int] = {}
        for i in range(0, len(items), 500):
            images = [
                {
                    "title": name,
                    "teamFileId": team_file_id,
                    "sourceBlob": {"offsetStart": start, "offsetEnd": end},
                }
                for name, start, end in items[i : i + 500]
            ]
            answer = self.client.post_json(
                "images.bulk.add",
                {
                    "datasetId": dataset_id,
                    "images": images,
                    "forceMetadataForLinks": False,
                    "skipValidation": False,
                },
            )
            if not isinstance(answer, list):
                raise RemoteError("images.bulk.add: answer is not a list")
            for info in answer:
                image = parse_image(info)
                out[image.name] = image.id
        return out

    def add_annotations(self, dataset_id: int, anns: Sequence[tuple[int, Any]]) -> None:
        for i in range(0, len(anns), ANN_ADD_BATCH):
            self.client.post_json(
                "annotations.bulk.add",
                {
                    "datasetId": dataset_id,
                    "skipBoundsValidation": False,
                    "annotations": [
                        {"imageId": image_id, "annotation": ann}
                        for image_id, ann in anns[i : i + ANN_ADD_BATCH]
                    ],
                },
            )
