"""Bad inputs against a real `bentoml serve`: a built corpus, then a bounded hypothesis fuzz.

Every case gets its documented status (README error table) with a one-line JSON error, or 200
where the input is actually valid; never a 5xx. Afterwards the server is still ready and its
worker's memory has not run away (decompression bombs are refused from the header).
"""
from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rel_corpus import corpus, digit, encode, photo_jpeg
from rel_server import AUTH, MAX_BODY, MAX_IMAGES, send, the_worker
from loadtests.soak import image_post, rss_kib

CORPUS = {it.name: it for it in corpus(MAX_BODY, MAX_IMAGES, AUTH)}
RSS_GROWTH_LIMIT_MIB = 150  # a decoded bomb would be GBs; warm caches and allocator slack are tens of MiB


@pytest.fixture(scope="module")
def rss_before(api_server) -> int:
    send(api_server, CORPUS["photo_jpeg"].request)  # warm the decoders once before the baseline
    return rss_kib(the_worker(api_server))


def check_answer(name: str, status: int, body: bytes, expected: int) -> None:
    assert status == expected, f"{name}: got {status}, expected {expected}: {body[:300]!r}"
    doc = json.loads(body)
    if expected >= 400:
        msg = doc.get("error")
        assert isinstance(msg, str) and msg and "\n" not in msg and "Traceback" not in msg, f"{name}: {doc}"
    else:
        assert doc.get("predictions") or doc.get("results"), f"{name}: {doc}"


@pytest.mark.parametrize("name", list(CORPUS))
def test_corpus_case(api_server, rss_before, name: str) -> None:
    item = CORPUS[name]
    r = send(api_server, item.request)
    assert r.status is not None, f"{name}: no answer ({r.error})"
    check_answer(name, r.status, r.body, item.status)


@pytest.mark.parametrize("chunked", [False, True])
def test_huge_body_is_413(api_server, rss_before, chunked: bool) -> None:
    """Over IMGSERVE_MAX_BODY_BYTES, declared (Content-Length) or streamed (chunked): 413 before parsing.

    httpx is used here because it reads an early answer while still sending, as curl does; a client
    that writes the whole body before reading may see the connection reset instead.
    """
    if chunked:
        head = b'--x\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
        r = httpx.post(api_server.url + "/classify", content=iter([head] + [b"\0" * 1_000_000] * 5),
                       headers={"content-type": "multipart/form-data; boundary=x", **AUTH}, timeout=30)
    else:
        r = httpx.post(api_server.url + "/classify", files={"image": ("big.png", b"\0" * (MAX_BODY + 1), "image/png")},
                       headers=AUTH, timeout=30)
    check_answer(f"huge body (chunked={chunked})", r.status_code, r.content, 413)


# -- fuzz --------------------------------------------------------------------------------------------
BASES = {"png": encode(digit(), "PNG"), "jpeg": encode(digit().convert("RGB"), "JPEG", quality=90),
         "gif": encode(digit(), "GIF"), "photo": photo_jpeg()[:20_000]}


@st.composite
def mutated(draw) -> bytes:
    """A valid image with a few bytes replaced, a slice cut out or repeated, and/or truncated."""
    data = bytearray(BASES[draw(st.sampled_from(sorted(BASES)))])
    for _ in range(draw(st.integers(0, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        i = draw(st.integers(0, len(data) - 1))
        j = draw(st.integers(i, min(len(data), i + 64)))
        data[i:j] = data[i:j] * draw(st.integers(0, 3))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


uploads = st.one_of(st.binary(max_size=4096), mutated(), mutated())
filenames = st.one_of(st.just(b"x.png"), st.binary(max_size=24).filter(lambda b: b'"' not in b and b"\r" not in b
                                                                        and b"\n" not in b))


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=uploads, filename=filenames, batch=st.booleans())
def test_fuzz_upload_never_5xx(api_server, rss_before, data: bytes, filename: bytes, batch: bool) -> None:
    req = (image_post(data, path="/classify_batch", field_name="images", filename=filename, headers=AUTH) if batch
           else image_post(data, filename=filename, headers=AUTH))
    r = send(api_server, req)
    assert r.status in (200, 400, 413), f"status {r.status} ({r.error}) for {len(data)} bytes {data[:32]!r}: {r.body[:300]!r}"
    doc = json.loads(r.body)
    assert ("error" in doc) == (r.status != 200), doc


def test_still_ready_and_memory_bounded(api_server, rss_before) -> None:
    """After the corpus (sent twice more) and the fuzz: /readyz 200, a good image 200, RSS bounded."""
    for _ in range(2):
        for item in CORPUS.values():
            assert send(api_server, item.request).status == item.status, item.name
    assert httpx.get(api_server.url + "/readyz", timeout=10).status_code == 200
    assert send(api_server, CORPUS["photo_jpeg"].request).status == 200
    after = rss_kib(the_worker(api_server))
    growth = (after - rss_before) / 1024
    print(f"\nworker RSS {rss_before / 1024:.1f} MiB -> {after / 1024:.1f} MiB ({growth:+.1f} MiB) "
          f"after {3 * len(CORPUS)} corpus requests and 150 fuzz cases")
    assert growth < RSS_GROWTH_LIMIT_MIB, f"worker RSS grew by {growth:.0f} MiB"
    assert "Traceback" not in api_server.log_path.read_text(errors="replace"), api_server.log_tail(60)
