"""The offline graph viewer: a hand-written circuit-tracer frontend JSON (schema version 1, RESEARCH.md 1.9)
rendered by `graph_html`, loaded from file:// in a real headless Chromium driven over the DevTools pipe
(tests/graphs/cdp_browser.py): no console message and no request beyond the file, one shape per node and one
line per link laid out by layer and position, hover details of nodes and edges, a feature's dashboard on
click, pins (initial, shift-click, the Pin button, Clear), escaping; and each bad input as a clear error."""

import copy
import json
import math
import re
import shutil

import numpy as np
import pytest
from cdp_browser import Browser

from jaxlens.dictionaries.dashboard import Context, FeatureDashboard
from jaxlens.errors import InputError
from jaxlens.graphs.viewer import graph_html, save_graph_html

N_LAYERS = 2
EVIL = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'
TOKENS = ["<bos>", "The", " cat", EVIL, " is"]
VOCAB = [1, 464, 3797, 666, 318]
LOGITS = [(257, " a", 0.5), (1802, " very", 0.25)]


def cantor(layer: int, feat: int) -> int:
    return (layer + feat) * (layer + feat + 1) // 2 + feat


def node(node_id, feat, layer, pos, feature_type, js_id, **fields):
    """One node with every field of RESEARCH.md 1.9's Node, defaults as circuit-tracer writes them."""
    return {"node_id": node_id, "feature": feat, "layer": layer, "ctx_idx": pos, "feature_type": feature_type,
            "token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0,
            "jsNodeId": js_id, "clerp": "", "influence": None, "activation": None, **fields}


def feature(layer, feat, pos, act, infl, clerp=""):
    return node(f"{layer}_{feat}_{pos}", cantor(layer, feat), str(layer), pos, "cross layer transcoder",
                f"{layer}_{feat}-0", clerp=clerp, influence=infl, activation=act)


def error(layer, pos, infl):
    return node(f"0_{layer}_{pos}", -1, str(layer), pos, "mlp reconstruction error", f"{layer}_{pos}-0",
                influence=infl)


def embedding(pos):
    v = VOCAB[pos]
    return node(f"E_{v}_{pos}", pos, "E", pos, "embedding", f"E_{v}-{pos}")


def logit(i, vocab_idx, text, prob):
    last = len(TOKENS) - 1
    return node(f"{N_LAYERS + 1}_{vocab_idx}_{last}", vocab_idx, str(N_LAYERS + 1), last, "logit",
                f"L_{vocab_idx}-{last}", token_prob=prob, is_target_logit=i == 0,
                clerp=f'Output "{text}" (p={prob:.3f})')


def graph_json() -> dict:
    nodes = [feature(0, 5, 2, 1.25, 0.4), feature(0, 5, 4, 0.5, 0.1), feature(1, 3, 3, 2.0, 0.6, clerp=EVIL),
             feature(1, 7, 4, 0.75, 0.3), feature(1, 11, 4, 0.125, 0.05), error(0, 4, 0.2), error(1, 4, 0.1)]
    nodes += [embedding(p) for p in range(len(TOKENS))]
    nodes += [logit(i, *x) for i, x in enumerate(LOGITS)]
    lg = [n["node_id"] for n in nodes if n["feature_type"] == "logit"]
    links = [("E_464_1", "0_5_2", 0.8125), ("0_5_2", "1_3_3", -0.5), ("1_3_3", lg[0], 1.5),
             ("1_7_4", lg[0], 0.375), ("0_0_4", "1_7_4", -0.25), ("E_318_4", "0_5_4", 0.625),
             ("0_5_4", lg[1], -0.125), ("0_1_4", lg[1], 0.0625), ("1_11_4", lg[0], 0.03125)]
    return {"metadata": {"slug": "toy", "scan": "toy-scan", "transcoder_list": [], "prompt_tokens": TOKENS,
                         "prompt": "".join(TOKENS), "node_threshold": 0.8, "schema_version": 1},
            "qParams": {"pinnedIds": ["1_7_4"], "supernodes": [], "linkType": "both", "clickedId": "",
                        "sg_pos": ""},
            "nodes": nodes, "links": [{"source": s, "target": t, "weight": w} for s, t, w in links]}


def board(feat: int, strings: list[str]) -> FeatureDashboard:
    ctx = Context(seq=4, pos=9, tokens=list(range(len(strings))), strings=strings,
                  acts=[0.0, 0.5, 2.5, 0.25][:len(strings)], centre=2)
    return FeatureDashboard(feature=feat, frequency=0.01, max_act=2.5, mean_act=1.0,
                            histogram=(np.array([3, 1]), np.array([0.0, 1.25, 2.5])), contexts=[ctx],
                            promoted=[(257, " a", 0.75)], suppressed=[(1802, " very", -0.5)])


BOARDS = {(0, 5): board(5, [" the", " fat", " cat", " sat"]), "1_3_3": board(3, [" on", EVIL, " mat"])}


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("The viewer tests need a headless browser; install Debian's chromium "
                    "(scripts/setup.sh runs `apt-get install -y chromium`).")
    with Browser(exe, tmp_path_factory.mktemp("profile")) as b:
        yield b


@pytest.fixture(scope="module")
def page(browser, tmp_path_factory):
    """The toy graph's page, loaded once; the tests below act on it in order."""
    path = save_graph_html(graph_json(), tmp_path_factory.mktemp("viewer") / "toy.html", dashboards=BOARDS)
    browser.open(path.as_uri())
    return browser, path


def test_console_check_has_teeth(browser, tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>console.error('boom'); notDefined();</script></body></html>")
    browser.open(bad.as_uri())
    assert any("boom" in m for m in browser.console) and any("notDefined" in m for m in browser.console)


def test_page_loads_quietly_and_fetches_nothing(page):
    b, path = page
    assert b.console == []
    assert set(b.requests) == {path.as_uri()}, "the page fetches nothing but itself"
    assert b.js("document.title") == "".join(TOKENS)
    assert save_graph_html(graph_json(), path.with_name("again.html"), dashboards=BOARDS).read_text() == \
        graph_html(graph_json(), dashboards=BOARDS) == path.read_text()


def test_one_shape_per_node_and_one_line_per_link(page):
    b, _ = page
    g = graph_json()
    drawn = b.js("Array.from(document.querySelectorAll('#graph .node')).map(function (e) { var r = "
                 "e.getBBox(); return [e.dataset.id, e.tagName, r.x + r.width / 2, r.y + r.height / 2]; })")
    assert sorted(d[0] for d in drawn) == sorted(n["node_id"] for n in g["nodes"])
    edges = b.js("Array.from(document.querySelectorAll('#graph .edge')).map(function (e) { return "
                 "[e.dataset.source, e.dataset.target, +e.dataset.weight, e.classList.contains('pos'), "
                 "+e.querySelector('.stroke').getAttribute('stroke-width')]; })")
    want = sorted((k["source"], k["target"], k["weight"]) for k in g["links"])
    assert sorted(tuple(e[:3]) for e in edges) == want
    assert all(e[3] == (e[2] >= 0) for e in edges), "blue positive, red negative"
    widths = {e[2]: e[4] for e in edges}
    assert widths[1.5] > widths[0.8125] > widths[-0.5] > widths[0.03125], "width grows with |weight|"
    kind = {n["node_id"]: n["feature_type"] for n in g["nodes"]}
    shapes = {kind[d[0]]: d[1] for d in drawn}
    assert shapes["cross layer transcoder"] == "circle" and shapes["mlp reconstruction error"] == "rect"
    assert shapes["embedding"] == shapes["logit"] == "path"
    at = {d[0]: (d[2], d[3]) for d in drawn}
    y = lambda nid: at[nid][1]
    # rows bottom to top (SVG y grows downwards): embeddings, layer 0, layer 1, logits
    assert y("E_464_1") > y("0_5_2") > y("1_3_3") > y("3_257_4")
    assert y("E_1_0") == y("E_318_4") and y("0_5_2") == y("0_0_4") and y("3_257_4") == y("3_1802_4")
    xs = [at[f"E_{v}_{p}"][0] for p, v in enumerate(VOCAB)]
    assert xs == sorted(xs) and len(set(xs)) == len(xs), "one column per position, left to right"
    labels = b.js("Array.from(document.querySelectorAll('#graph .token-label')).map(function (e) { "
                  "var r = e.getBBox(); return [e.querySelector('title').textContent, "
                  "e.querySelector('tspan').textContent, r.x + r.width / 2]; })")
    assert [t for t, _, _ in labels] == TOKENS
    assert [s for _, s, _ in labels] == TOKENS[:3] + [EVIL[:9] + "\u2026", " is"], "long tokens cut to fit"
    np.testing.assert_allclose([x for _, _, x in labels], xs, atol=1.0)  # each label under its column


def test_hover_shows_node_and_edge_details(page):
    b, _ = page
    b.hover(*b.centre('#graph .node[data-id="1_3_3"]'))
    tip = b.js("(function (t) { return t.hidden ? null : t.innerText; })(document.getElementById('tooltip'))")
    for want in ("1_3_3", "feature\t3", "activation\t2.000", "influence\t0.6000", EVIL):
        assert want in tip
    hit = b.js("""(function () {  // a point of the edge E_464_1 -> 0_5_2 that no other element covers
      var g = document.querySelector('#graph .edge[data-source="E_464_1"]'), l = g.querySelector('.hit');
      g.scrollIntoView({block: 'center', inline: 'center'});
      var m = l.getScreenCTM();
      for (var t = 0.3; t < 0.75; t += 0.05) {
        var p = new DOMPoint(+l.getAttribute('x1') * (1 - t) + +l.getAttribute('x2') * t,
                             +l.getAttribute('y1') * (1 - t) + +l.getAttribute('y2') * t).matrixTransform(m);
        if (document.elementFromPoint(p.x, p.y) === l) { return [p.x, p.y]; }
      }
      return null; })()""")
    assert hit is not None
    b.hover(*hit)
    tip = b.js("document.getElementById('tooltip').innerText")
    assert "E_464_1 \u2192 0_5_2" in tip and "weight\t0.8125" in tip and "emb The @1" in tip


def test_click_opens_the_feature_dashboard(page):
    b, _ = page
    for nid, key in (("0_5_4", (0, 5)), ("1_3_3", "1_3_3")):  # keyed by (layer, feature) and by node_id
        b.click(*b.centre(f'#graph .node[data-id="{nid}"]'))
        panel = b.js("(function () { var d = document.getElementById('dashboard-body'); "
                     "return [d.dataset.node, d.querySelector('h2').textContent, "
                     "d.querySelector('.ctx').textContent, "
                     "d.querySelector('span.tok.top').style.backgroundColor, "
                     "d.querySelector('table.logits.pos').textContent]; })()")
        ctx = BOARDS[key].contexts[0]
        assert panel[0] == nid and panel[1] == f"Feature {BOARDS[key].feature}"
        assert panel[2] == f"{ctx.value:.3f}" + "".join(ctx.strings), "the top context, in full"
        assert panel[3] == "rgb(232, 89, 12)", "the dashboard's own script shaded the top token"
        assert " a" in panel[4]
    b.click(*b.centre('#graph .node[data-id="1_11_4"]'))  # a feature without a dashboard
    assert "No dashboard" in b.js("document.getElementById('dashboard-body').textContent")
    assert b.js("window.__pwned") is None, "no token, label or dashboard text ran as script"
    assert b.console == []


def test_pins_initial_shift_click_button_and_clear(page):
    b, _ = page
    pins = lambda: b.js("[Array.from(document.querySelectorAll('#pinned li')).map(function (e) { return "
                        "e.dataset.id; }), document.getElementById('pinned-ids').textContent, "
                        "Array.from(document.querySelectorAll('#graph .node.pinned')).map(function (e) { "
                        "return e.dataset.id; })]")
    assert pins() == [["1_7_4"], "1_7_4", ["1_7_4"]], "qParams.pinnedIds are pinned on load"
    b.click(*b.centre('#graph .node[data-id="0_5_2"]'), shift=True)
    assert pins()[:2] == [["1_7_4", "0_5_2"], "1_7_4,0_5_2"]
    b.click(*b.centre('#graph .node[data-id="E_1_0"]'))
    b.click(*b.centre("#pin-button"))
    assert pins()[0] == ["1_7_4", "0_5_2", "E_1_0"]
    b.click(*b.centre("#only-pinned"))  # the subgraph alone: only edges between pinned nodes remain
    shown = b.js("Array.from(document.querySelectorAll('#graph .node, #graph .edge')).filter(function (e) { "
                 "return getComputedStyle(e).display !== 'none'; }).map(function (e) { "
                 "return e.dataset.id || e.dataset.source + '>' + e.dataset.target; })")
    assert sorted(shown) == sorted(["1_7_4", "0_5_2", "E_1_0"])
    b.click(*b.centre("#only-pinned"))
    b.click(*b.centre('#graph .node[data-id="0_5_2"]'), shift=True)  # shift-click again unpins
    assert pins()[0] == ["1_7_4", "E_1_0"]
    b.click(*b.centre("#clear-pins"))
    assert pins() == [[], "", []]
    assert b.console == []


def test_clicked_id_and_escaping_in_the_source(tmp_path):
    g = graph_json()
    g["qParams"]["clickedId"] = "1_3_3"
    text = graph_html(g, dashboards=BOARDS, title=EVIL)
    assert "<script>window" not in text and "<img" not in text, "graph text is data, not markup"
    assert text.count("<script") == 3  # the JSON data, the dashboard shading, the viewer
    data = json.loads(re.search(r'<script type="application/json" id="graph-data">(.*?)</script>', text,
                                re.S).group(1))
    assert data["metadata"]["prompt_tokens"] == TOKENS and data["qParams"]["clickedId"] == "1_3_3"
    assert data["dashboards"] == {"0_5_2": "dash-0", "0_5_4": "dash-0", "1_3_3": "dash-1"}
    escaped = EVIL.replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
    assert f"<title>{escaped}</title>" in text
    # numpy numbers (as a graph built with numpy may hold) become plain JSON numbers
    g["links"][0]["weight"] = np.float32(0.8125)
    assert json.loads(re.search(r'id="graph-data">(.*?)</script>', graph_html(g), re.S).group(1))[
        "links"][0]["weight"] == 0.8125


def test_clicked_id_opens_on_load(browser, tmp_path):
    g = graph_json()
    g["qParams"]["clickedId"] = "1_3_3"
    browser.open(save_graph_html(g, tmp_path / "clicked.html", dashboards=BOARDS).as_uri())
    assert browser.js("document.getElementById('dashboard-body').dataset.node") == "1_3_3"
    assert browser.js("window.__pwned") is None and browser.console == []


def test_a_real_graph_through_frontend_json(browser, tmp_path):
    """AttributionGraph.save_html -> export.frontend_json -> this viewer, in the browser."""
    from random_graphs import random_graph

    from jaxlens.graphs.export import frontend_json

    graph = random_graph(3, n_layers=3, n_pos=6)
    want = frontend_json(graph, "random")
    browser.open(graph.save_html(tmp_path / "random.html").as_uri())
    assert browser.console == []
    assert browser.js("document.querySelectorAll('#graph .node').length") == len(want["nodes"]) > 10
    assert browser.js("document.querySelectorAll('#graph .edge').length") == len(want["links"]) > 10


def broken(edit):
    g = copy.deepcopy(graph_json())
    edit(g)
    return g


@pytest.mark.parametrize("edit,match", [
    (lambda g: g.pop("nodes"), r"graph_json lacks 'nodes'; found keys \['links', 'metadata', 'qParams'\]"),
    (lambda g: g["links"].append({"source": "0_5_2", "target": "1_3_9", "weight": 1.0}),
     r"links\[9\]\['target'\] names node '1_3_9', which is not in the graph's nodes. Did you mean '1_3_3'"),
    (lambda g: g["links"].append({"source": "0_5_2", "weight": 1.0}),
     r"links\[9\] must be a dict with 'source'"),
    (lambda g: g["links"][0].update(weight=math.nan),
     r"links\[0\]\['weight'\] must be a finite number; found nan"),
    (lambda g: g["links"][0].update(weight="big"), r"must be a finite number; found 'big'"),
    (lambda g: g["nodes"].append(dict(g["nodes"][0])), r"nodes\[14\] and nodes\[0\] share node_id '0_5_2'"),
    (lambda g: g["nodes"][0].pop("ctx_idx"), r"nodes\[0\] lacks 'ctx_idx'; found keys"),
    (lambda g: g["nodes"][0].update(feature_type="sae"), r"feature_type 'sae'; the viewer knows"),
    (lambda g: g["nodes"][0].update(layer="L0"), r"Node '0_5_2' has layer 'L0'; expected a layer number"),
    (lambda g: g["nodes"][0].update(ctx_idx=5), r"ctx_idx 5, but metadata\['prompt_tokens'\] has 5 tokens"),
    (lambda g: g["nodes"][0].update(ctx_idx=-1), r"ctx_idx -1; expected a position >= 0"),
    (lambda g: g["nodes"][0].update(activation=math.inf), r"node '0_5_2''s 'activation' must be a finite"),
    (lambda g: g["qParams"].update(pinnedIds=["1_7_5"]), r"qParams\['pinnedIds'\] names node '1_7_5'"),
    (lambda g: g["qParams"].update(clickedId="nope"), r"qParams\['clickedId'\] names node 'nope'"),
    (lambda g: g.update(nodes={}), r"graph_json\['nodes'\] must be a list; found dict"),
    (lambda g: g["metadata"].update(prompt_tokens="The cat"), r"prompt_tokens'\] must be a list of strings"),
    (lambda g: g["metadata"].update(extra=object()), r"holds a value JSON cannot represent"),
])
def test_bad_graph_json_is_a_clear_error(edit, match):
    with pytest.raises(InputError, match=match):
        graph_html(broken(edit))


def test_bad_dashboards_are_a_clear_error():
    g = graph_json()
    with pytest.raises(InputError, match=r"dashboards key \(feature node ids\) names node '0_5_3'.*'0_5_2'"):
        graph_html(g, dashboards={"0_5_3": BOARDS["1_3_3"]})
    with pytest.raises(InputError, match=r"key \(2, 5\) \(layer, feature\) matches no feature node"):
        graph_html(g, dashboards={(2, 5): BOARDS[(0, 5)]})
    with pytest.raises(InputError, match=r"\[\(0, 5\)\] shows feature 3, but node '0_5_2' is feature 5"):
        graph_html(g, dashboards={(0, 5): BOARDS["1_3_3"]})
    with pytest.raises(InputError, match=r"must be a FeatureDashboard .* found dict"):
        graph_html(g, dashboards={"1_3_3": {}})
    with pytest.raises(InputError, match=r"or a \(layer, feature\) pair of ints; found \(0, 5, 2\)"):
        graph_html(g, dashboards={(0, 5, 2): BOARDS[(0, 5)]})
