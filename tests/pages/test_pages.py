"""The HTML pages, rendered by the app on a real database (Postgres and SQLite)."""

from __future__ import annotations

import html
import re
import xml.etree.ElementTree as ET
from urllib.parse import parse_qs, urlsplit

import pytest
from fastapi.testclient import TestClient

from api.pages import BoardQuery
from api.schemas import SortKey, SortOrder
from db.models import SubmissionStatus
from evaluator.vocabulary import TrainingMethod
from tests.api.conftest import Account
from tests.factories import create_finished
from tests.fixtures_db import TestDatabase
from tests.pages import seed
from tests.pages.conftest import XSS_NAME, Board, submission

HTML = {"Accept": "text/html"}


def get_html(client: TestClient, url: str, status: int = 200) -> str:
    response = client.get(url, headers=HTML)
    assert response.status_code == status, response.text[:500]
    assert response.headers["content-type"].startswith("text/html")
    return response.text


def table(page: str) -> str:
    match = re.search(r'<table class="board">(.*?)</table>', page, re.S)
    assert match, "no leaderboard table"
    return match.group(1)


def ranked_ids(page: str) -> list[str]:
    body = table(page).split("<tbody>", 1)[1]
    return re.findall(r'<a href="/submissions/([0-9a-f]{32})"', body)


def header_link(page: str, label: str) -> str:
    match = re.search(r'<a href="([^"]*)"[^>]*>' + re.escape(label) + r"[<\s]", table(page))
    assert match, f"no header link {label!r}"
    return html.unescape(match.group(1))


def download_link(page: str, media_type: str) -> str:
    match = re.search(r'<a href="([^"]+)" type="' + re.escape(media_type) + '">', page)
    assert match, f"no {media_type} link"
    return html.unescape(match.group(1))


def aria_sorted(page: str) -> list[tuple[str, str]]:
    """(aria-sort, header text) of the sorted column(s)."""
    return [
        (m.group(1), re.sub(r"<[^>]+>", "", m.group(2)).strip(" ▼▲†"))
        for m in re.finditer(r'<th[^>]*aria-sort="(\w+)"[^>]*>(.*?)</th>', table(page), re.S)
    ]


# --- Home -----------------------------------------------------------------------------------


def test_home_lists_benchmarks_with_counts_and_top_entries(client: TestClient, board: Board):
    page = get_html(client, "/")
    for title in ("CIFAR-10", "ImageNet", "MNIST", "Digits (demo)"):
        assert title in page
    # Four public, finished, unflagged digits models; the others have none yet.
    assert "4 models evaluated" in page
    assert "0 models evaluated" in page
    assert f'href="/submissions/{board.robust}"' in page
    assert 'href="/leaderboard/digits"' in page
    assert "Secret model" not in page and "Flagged model" not in page


def test_home_explains_the_threat_model_metrics_and_the_papers_numbers(
    client: TestClient, board: Board
):
    page = get_html(client, "/")
    assert "30°" in page and "775" in page and "10% of its size" in page
    for label in ("Natural", "Random", "Worst-of-10", "Grid", "First-order", "Vote",
                  "Grid + vote (adaptive)"):  # fmt: skip
        assert f"<dt>{html.escape(label)}" in page
    assert "reported in the paper" in page
    assert "71%" in page and "82%" in page and "31%" in page


# --- Leaderboard ------------------------------------------------------------------------------


def test_leaderboard_ranks_by_grid_and_hides_what_is_not_public_and_finished(
    client: TestClient, board: Board
):
    page = get_html(client, "/leaderboard/digits")
    # Grid: 0.71, 0.52, 0.04, then the one without a grid value.
    assert ranked_ids(page) == [board.robust, board.augmented, board.standard, board.xss]
    for hidden in (board.private, board.flagged, board.queued, board.running, board.failed):
        assert hidden not in page
    assert aria_sorted(page) == [("descending", "Grid")]
    assert "sorted by grid, best first" in page


def test_leaderboard_states_the_protocol_above_the_table(client: TestClient, board: Board):
    page = get_html(client, "/leaderboard/digits")
    protocol = page.index('id="protocol-heading"')
    assert protocol < page.index('<table class="board">')
    section = page[protocol : page.index("</section>", protocol)]
    assert "31 × 5 × 5 = <strong>775</strong>" in section
    assert "±30°" in section and "±3 px" in section
    assert "<dt>Seed</dt><dd>0</dd>" in section
    assert "majority of 10 uniform draws" in section
    assert "against the <strong>adaptive</strong> attacker" in section
    cifar = get_html(client, "/leaderboard/cifar10")
    assert "first 1,000 images" in cifar  # the vote subset is stated


def test_leaderboard_columns(client: TestClient, board: Board):
    page = get_html(client, "/leaderboard/digits")
    head = table(page).split("<tbody>")[0]
    labels = ("Rank", "Model", "Architecture", "Training", "Extra data", "Natural", "Random",
              "Worst-of-10", "Grid", "First-order", "Vote", "Grid + vote (adaptive)", "Date",
              "Paper")  # fmt: skip
    for label in labels:
        assert html.escape(label) in head, label
    row = table(page).split("<tbody>")[1].split("</tr>")[2]  # the standard CNN
    assert "95.0%" in row and "4.0%" in row and "small_cnn" in row and "standard" in row
    assert 'href="https://arxiv.org/abs/1712.02779"' in row
    assert "badge-baseline" in row


@pytest.mark.parametrize(
    ("label", "expected"),
    [
        ("Natural", ["augmented", "standard", "robust", "xss"]),
        ("Random", ["robust", "augmented", "standard", "xss"]),
        ("Grid + vote (adaptive)", ["robust", "augmented", "standard", "xss"]),
        # Names A to Z, case-insensitive; "<" sorts before letters.
        ("Model", ["xss", "augmented", "standard", "robust"]),
    ],
)
def test_sorting_by_a_header_link(
    client: TestClient, board: Board, label: str, expected: list[str]
):
    link = header_link(get_html(client, "/leaderboard/digits"), label)
    page = get_html(client, link)
    assert ranked_ids(page) == [getattr(board, name) for name in expected]
    assert [text for _, text in aria_sorted(page)] == [label]


def test_clicking_the_sorted_header_again_reverses_the_order(client: TestClient, board: Board):
    first = get_html(client, header_link(get_html(client, "/leaderboard/digits"), "Natural"))
    assert aria_sorted(first) == [("descending", "Natural")]
    second = get_html(client, header_link(first, "Natural"))
    assert aria_sorted(second) == [("ascending", "Natural")]
    assert ranked_ids(second) == [board.xss, board.robust, board.standard, board.augmented]


def test_sort_links_keep_the_filters_and_go_back_to_the_first_page(
    client: TestClient, board: Board
):
    page = get_html(client, "/leaderboard/digits?training_method=standard&search=cnn&page=2")
    query = parse_qs(urlsplit(header_link(page, "Random")).query)
    assert query == {"sort": ["random"], "training_method": ["standard"], "search": ["cnn"]}


def test_filter_by_training_method(client: TestClient, board: Board):
    page = get_html(client, "/leaderboard/digits?training_method=worst-of-k")
    assert ranked_ids(page) == [board.robust]
    assert '<option value="worst-of-k" selected>' in page
    assert "1 model matches." in page


def test_filter_by_architecture(client: TestClient, board: Board, test_db: TestDatabase):
    create_finished(test_db.session, display_name="Other arch", architecture="resnet32")
    test_db.session.commit()
    page = get_html(client, "/leaderboard/digits?architecture=resnet32")
    assert [n for n in re.findall(r">([^<>]+)</a>", table(page)) if n == "Other arch"]
    assert len(ranked_ids(page)) == 1
    assert '<option value="resnet32" selected>' in page


def test_search_by_name(client: TestClient, board: Board):
    page = get_html(client, "/leaderboard/digits?search=augmented")
    assert ranked_ids(page) == [board.augmented]
    assert 'value="augmented"' in page
    assert "Clear filters" in page
    empty = get_html(client, "/leaderboard/digits?search=nothing-like-this")
    assert "No model matches these filters." in empty
    assert '<table class="board">' not in empty


def test_pagination(client: TestClient, board: Board):
    page = get_html(client, "/leaderboard/digits?per_page=2&page=2")
    assert ranked_ids(page) == [board.standard, board.xss]
    assert "showing 3–4" in page
    assert "Page 2 of 2" in page
    prev = re.search(r'<a href="([^"]+)" rel="prev">', page)
    assert prev and html.unescape(prev.group(1)) == "/leaderboard/digits?per_page=2"
    assert 'rel="next"' not in page
    # The rank is over the whole board, not the page.
    assert re.findall(r'<td class="num rank">(\d+)</td>', page) == ["3", "4"]


def test_best_value_in_each_column_is_marked_over_all_pages(client: TestClient, board: Board):
    first = get_html(client, "/leaderboard/digits")
    best_cells = re.findall(r'<td class="num[^"]*\bbest\b[^"]*"[^>]*>([^<]+)<', table(first))
    # natural 96%, random 90%, worst 83%, grid 71%, vote 95%, grid+vote 80%.
    assert sorted(best_cells) == sorted(["96.0%", "90.0%", "83.0%", "71.0%", "95.0%", "80.0%"])
    # Page 2 holds none of the best values: they are best over the board, not over the page.
    second = get_html(client, "/leaderboard/digits?per_page=2&page=2")
    assert re.findall(r'<td class="num[^"]*\bbest\b', table(second)) == []


def test_json_and_csv_links_give_exactly_the_rows_shown(client: TestClient, board: Board):
    page = get_html(client, "/leaderboard/digits?sort=natural&order=asc&per_page=2&page=2")
    json_link, csv_link = download_link(page, "application/json"), download_link(page, "text/csv")
    assert urlsplit(json_link).path == "/api/v1/leaderboard/digits"
    assert parse_qs(urlsplit(json_link).query) == {
        "sort": ["natural"], "order": ["asc"], "page": ["2"], "per_page": ["2"],
    }  # fmt: skip
    assert parse_qs(urlsplit(csv_link).query)["format"] == ["csv"]
    shown = ranked_ids(page)
    data = client.get(json_link).json()
    assert [row["submission_id"] for row in data["rows"]] == shown
    csv = client.get(csv_link)
    assert csv.status_code == 200
    assert [line.split(",")[1] for line in csv.text.splitlines()[1:]] == shown


def test_json_link_carries_the_filters(client: TestClient, board: Board):
    page = get_html(client, "/leaderboard/digits?training_method=augmentation&search=cnn")
    json_link = download_link(page, "application/json")
    query = parse_qs(urlsplit(json_link).query)
    assert query["training_method"] == ["augmentation"] and query["search"] == ["cnn"]
    rows = client.get(json_link).json()["rows"]
    assert [row["submission_id"] for row in rows] == ranked_ids(page) == [board.augmented]


def test_bad_query_values_fall_back_to_defaults(client: TestClient, board: Board):
    page = get_html(
        client, "/leaderboard/digits?sort=bogus&order=sideways&training_method=x&page=-3"
    )
    assert ranked_ids(page) == [board.robust, board.augmented, board.standard, board.xss]


def test_board_query_parse_and_urls():
    q = BoardQuery.parse({"sort": "natural", "order": "desc", "page": "0", "per_page": "9999"})
    assert q.sort is SortKey.NATURAL and q.page == 1 and q.per_page == 500
    assert q.params() == {"sort": "natural", "per_page": "500"}
    assert q.aria_sort(SortKey.NATURAL) == "descending" and q.aria_sort(SortKey.GRID) is None
    assert q.sort_link("/x", SortKey.NATURAL) == "/x?sort=natural&order=asc&per_page=500"
    assert BoardQuery().sort_link("/x", SortKey.NAME) == "/x?sort=name"
    assert BoardQuery(order=SortOrder.ASC).effective_order is SortOrder.ASC
    assert BoardQuery.parse({"training_method": "worst-of-k"}).training_method is (
        TrainingMethod.WORST_OF_K
    )


# --- Escaping -------------------------------------------------------------------------------


def test_user_text_is_escaped_everywhere(client: TestClient, board: Board):
    escaped = html.escape(XSS_NAME, quote=False)
    urls = ("/", "/leaderboard/digits", f"/submissions/{board.xss}",
            f"/submissions/{board.failed}", "/leaderboard/digits?search=%3Cscript%3E")  # fmt: skip
    for url in urls:
        page = get_html(client, url)
        assert XSS_NAME not in page, url
        assert "<script>alert" not in page, url
    assert escaped in get_html(client, f"/submissions/{board.xss}")
    assert escaped in get_html(client, f"/submissions/{board.failed}")
    search = get_html(client, "/leaderboard/digits?search=%22%3E%3Cscript%3E")
    assert 'value="&#34;&gt;&lt;script&gt;"' in search


def test_pages_send_a_content_security_policy(client: TestClient, board: Board):
    response = client.get("/leaderboard/digits")
    policy = response.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy
    assert response.headers["x-content-type-options"] == "nosniff"


# --- Submission pages in each state -------------------------------------------------------------


def test_finished_submission_page(client: TestClient, board: Board):
    page = get_html(client, f"/submissions/{board.standard}")
    assert "<h1>Standard CNN" in page and "status-finished" in page
    assert "95.0%" in page and "4.0%" in page and "22 / 540 images" in page
    for plot in ("landscape.svg", "rotation.svg", "fool-histogram.svg"):
        assert f'src="/submissions/{board.standard}/{plot}"' in page
    assert f'src="/submissions/{board.standard}/examples/00_original.png"' in page
    assert f'src="/submissions/{board.standard}/examples/00_transformed.png"' in page
    assert "→ predicted <strong>" in page and "(never fooled)" in page
    record = page[page.index('id="repro-heading"') :]
    for fact in ("<dt>Seed</dt>", "31 × 5 × 5", "cpu (test)", "fp32", "183,245",
                 "42.5 s", "torch 2.14.1", "first 500 images"):  # fmt: skip
        assert fact in record, fact
    assert f"curl -s http://testserver/api/v1/submissions/{board.standard}" in page
    assert "progress.js" not in page and "http-equiv" not in page


def _fidelity(test_db: TestDatabase, owner: Account, name: str, **fields: object) -> str:
    base = seed.evaluation_fields(0.93, 0.90, 0.83, 0.71, 0.93, 0.80, sensitivity=0.3)
    evaluation = seed.fidelity_fields(base, **fields)  # type: ignore[arg-type]
    created = create_finished(test_db.session, owner.user, display_name=name,
                              evaluation=evaluation)  # fmt: skip
    test_db.session.commit()
    return created.id


def test_grid_vote_column_names_its_attacker(client: TestClient, board: Board):
    head = table(get_html(client, "/leaderboard/digits")).split("<tbody>")[0]
    header = re.search(r'data-sort="grid_vote">(.*?)</a>', head, re.S)
    assert header and header.group(1).startswith("Grid + vote (adaptive)")
    tooltip = re.search(r'title="([^"]*)" data-sort="grid_vote"', head)
    assert tooltip and "drawn once and reused" in html.unescape(tooltip.group(1))


def test_first_order_column_sorts_and_is_empty_where_not_measured(
    client: TestClient, board: Board, test_db: TestDatabase, alice: Account
):
    low = _fidelity(test_db, alice, "FO low", per_query=0.1, transfer=0.9, first_order=0.75)
    high = _fidelity(test_db, alice, "FO high", per_query=0.1, transfer=0.9, first_order=0.9)
    broken = _fidelity(test_db, alice, "FO none", per_query=0.1, transfer=0.9,
                       first_order=None, first_order_error="no gradient")  # fmt: skip
    page = get_html(client, header_link(get_html(client, "/leaderboard/digits"), "First-order"))
    assert aria_sorted(page) == [("descending", "First-order")]
    ranked = ranked_ids(page)
    assert ranked[:2] == [high, low]
    assert ranked.index(broken) > 1  # missing values sort last
    body = table(page).split("<tbody>")[1]
    row = next(r for r in body.split("</tr>") if broken in r)
    assert row.count('title="not measured"') == 1  # first-order only: every other is measured
    data = client.get("/api/v1/leaderboard/digits?sort=first_order").json()
    assert [r["first_order"] for r in data["rows"][:2]] == [0.9, 0.75]
    csv_head = client.get("/api/v1/leaderboard/digits?format=csv").text.splitlines()[0]
    assert "first_order" in csv_head.split(",")


def test_model_page_shows_the_three_attackers_first_order_and_ablations(
    client: TestClient, board: Board, test_db: TestDatabase, alice: Account
):
    sid = _fidelity(test_db, alice, "Full record", per_query=0.12, transfer=0.86,
                    first_order=0.75)  # fmt: skip
    page = get_html(client, f"/submissions/{sid}")
    votes = page[
        page.index('id="votes-heading"') : page.index("</table>", page.index('id="votes-heading"'))
    ]
    for protocol, value, attacker in (("adaptive", "80.0%", "searches every grid point"),
                                      ("per-query", "12.0%", "Fresh vote draws"),
                                      ("transfer", "86.0%", "decides once")):  # fmt: skip
        row = votes[votes.index(f'id="vote-{protocol}"') :].split("</tr>")[0]
        assert value in row and attacker in row, protocol
        assert '<td class="num">50</td>' in row  # the vote's own images, not the run's 540
    cards = page[page.index('id="results-heading"') : page.index('id="votes-heading"')]
    assert "45 / 60 images" in cards  # first-order on its own subset
    assert "+4.0 points against grid on the same images" in cards
    assert "40 / 50 images" in cards and "Grid + vote (adaptive)" in cards
    ablations = page[page.index('id="ablations-heading"') :].split("</table>")[0]
    for label, grid in (("rotation only (31 x 1 x 1)", "31 × 1 × 1"),
                        ("translation only (1 x 5 x 5)", "1 × 5 × 5"),
                        ("black canvas (2x side, zero fill)", "31 × 5 × 5")):  # fmt: skip
        row = ablations[ablations.index(label) :].split("</tr>")[0]
        assert grid in row and '<td class="num">60</td>' in row, label
    assert "black canvas 2× the side" in ablations
    record = page[page.index('id="repro-heading"') :]
    assert "grid_vote_per_query 50" in record and "first_order 60" in record


def test_model_page_says_why_first_order_has_no_number(
    client: TestClient, board: Board, test_db: TestDatabase, alice: Account
):
    sid = _fidelity(test_db, alice, "No gradient", per_query=0.1, transfer=0.9,
                    first_order=None, first_order_error="the model has no gradient")  # fmt: skip
    page = get_html(client, f"/submissions/{sid}")
    assert "not differentiable: the model has no gradient" in page
    assert "points against grid" not in page


def test_old_style_result_renders_without_the_new_sections(client: TestClient, board: Board):
    page = get_html(client, f"/submissions/{board.robust}")
    assert "Grid + vote (adaptive)" in page and "80.0%" in page
    assert 'id="votes-heading"' not in page and 'id="ablations-heading"' not in page
    assert "attacker model not recorded" in page


def test_api_exposes_the_attackers_first_order_and_ablations(
    client: TestClient, board: Board, test_db: TestDatabase, alice: Account
):
    sid = _fidelity(test_db, alice, "API record", per_query=0.12, transfer=0.86,
                    first_order=0.75)  # fmt: skip
    response = client.get(f"/api/v1/submissions/{sid}")
    assert response.status_code == 200, response.text
    evaluation = response.json()["evaluation"]
    assert evaluation["metrics"] == {
        "natural": 0.93, "random": 0.9, "worst_of_k": 0.83, "grid": 0.71, "vote_natural": 0.93,
        "grid_vote": 0.8, "grid_vote_per_query": 0.12, "grid_vote_transfer": 0.86,
        "first_order": 0.75,
    }  # fmt: skip
    assert evaluation["details"]["grid_vote"]["protocol"] == "adaptive"
    assert evaluation["details"]["grid_vote"]["images"] == 50
    assert set(evaluation["ablations"]) == {"rotation-only", "translation-only", "black-canvas"}
    assert evaluation["ablations"]["rotation-only"]["grid"] == [31, 1, 1]
    old = client.get(f"/api/v1/submissions/{board.robust}").json()["evaluation"]
    assert old["ablations"] == {} and old["metrics"]["first_order"] is None


def test_finished_submission_without_landscape_has_no_plots(client: TestClient, board: Board):
    page = get_html(client, f"/submissions/{board.xss}")
    assert "landscape.svg" not in page and "fool-histogram.svg" not in page
    assert "not measured" in page


def test_queued_submission_page_polls_and_refreshes_without_javascript(
    client: TestClient, board: Board
):
    page = get_html(client, f"/submissions/{board.queued}")
    assert "Waiting for a worker" in page and "status-queued" in page
    assert f'data-poll-url="/api/v1/submissions/{board.queued}"' in page
    assert '<noscript><meta http-equiv="refresh" content="10"></noscript>' in page
    assert re.search(r'<script src="/static/progress\.js\?v=\w+" defer></script>', page)
    assert 'value="0.0000"' in page
    assert "estimating…" in page


def test_running_submission_page_shows_progress(client: TestClient, board: Board):
    page = get_html(client, f"/submissions/{board.running}")
    assert "Evaluating" in page and "phase: grid" in page
    assert '<progress id="progress" max="1" value="0.4200"' in page
    assert "42.0%" in page and "123,456" in page and "about 5 min" in page
    assert "progress.js" in page
    assert "Results" not in page


def test_failed_submission_page_shows_the_message(client: TestClient, board: Board):
    page = get_html(client, f"/submissions/{board.failed}")
    assert "The evaluation failed" in page
    assert "The model returned 5 classes, the benchmark has 10." in page
    assert "progress.js" not in page and "http-equiv" not in page


def test_cancelled_submission_page(client: TestClient, board: Board):
    page = get_html(client, f"/submissions/{board.cancelled}")
    assert "Cancelled by its owner before it started." in page


def test_flagged_submission_page_says_so(client: TestClient, board: Board):
    page = get_html(client, f"/submissions/{board.flagged}")
    assert "badge-flagged" in page and "not ranked on the leaderboard" in page


def test_status_changes_show_on_the_next_view(
    client: TestClient, board: Board, test_db: TestDatabase
):
    row = submission(test_db, board.running)
    row.status = SubmissionStatus.FAILED
    row.message = "Out of memory."
    test_db.session.commit()
    page = get_html(client, f"/submissions/{board.running}")
    assert "Out of memory." in page and "progress.js" not in page


# --- Not found, private -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    ["/leaderboard/nope", "/submissions/0123456789abcdef0123456789abcdef", "/no/such/page",
     "/submissions/0123456789abcdef0123456789abcdef/landscape.svg"],
)  # fmt: skip
def test_not_found_is_an_html_page(client: TestClient, board: Board, url: str):
    page = get_html(client, url, status=404)
    assert "<h1>Not found</h1>" in page and 'href="/"' in page


def test_api_404s_stay_json(client: TestClient):
    response = client.get("/api/v1/nothing-here", headers=HTML)
    assert response.status_code == 404
    assert response.json()["error"] == "not_found"
    assert client.get("/no/such/page").json()["error"] == "not_found"  # no Accept: text/html


def test_private_submission_is_not_found_even_for_its_owner(
    client: TestClient, board: Board, alice: Account
):
    # The pages are anonymous: even the owner's token does not show it (the API does).
    for url in (f"/submissions/{board.private}", f"/submissions/{board.private}/landscape.svg"):
        response = client.get(url, headers={**HTML, **alice.headers})
        assert response.status_code == 404
        assert "Secret model" not in response.text
    assert client.get(f"/api/v1/submissions/{board.private}", headers=alice.headers).is_success


# --- Plots and images ----------------------------------------------------------------------


@pytest.mark.parametrize("plot", ["landscape", "rotation", "fool-histogram"])
def test_plots_are_valid_svg_and_cached(client: TestClient, board: Board, plot: str):
    url = f"/submissions/{board.standard}/{plot}.svg"
    response = client.get(url)
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/svg+xml"
    root = ET.fromstring(response.content)
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert float(root.attrib["width"].removesuffix("pt")) > 100
    again = client.get(url)
    assert again.content == response.content
    etag = response.headers["etag"]
    assert client.get(url, headers={"If-None-Match": etag}).status_code == 304


def test_plots_of_unfinished_or_plotless_submissions_are_not_found(
    client: TestClient, board: Board
):
    assert client.get(f"/submissions/{board.running}/landscape.svg").status_code == 404
    assert client.get(f"/submissions/{board.xss}/landscape.svg").status_code == 404
    assert client.get(f"/submissions/{board.xss}/fool-histogram.svg").status_code == 404


def test_example_images_are_served_by_listed_name_only(client: TestClient, board: Board):
    ok = client.get(f"/submissions/{board.standard}/examples/00_original.png")
    assert ok.status_code == 200
    assert ok.headers["content-type"] == "image/png"
    assert ok.content.startswith(b"\x89PNG\r\n\x1a\n")
    for name in ("99_original", "00_other", "..%2F..%2Fsecret", "0_original", "00_original.png"):
        url = f"/submissions/{board.standard}/examples/{name}.png"
        assert client.get(url).status_code == 404, name
    # Another submission's listed name is not this one's.
    assert client.get(f"/submissions/{board.robust}/examples/00_original.png").status_code == 404


def test_static_files(client: TestClient):
    css = client.get("/static/style.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    assert client.get("/static/progress.js").status_code == 200
