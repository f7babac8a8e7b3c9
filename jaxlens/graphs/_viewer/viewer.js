// jaxlens attribution-graph viewer (jaxlens/graphs/viewer.py embeds this file in the page).
// Reads the graph from the JSON element #graph-data, draws it as SVG laid out by layer (rows, embeddings at the
// bottom, logits at the top) and position (columns, one per prompt token), and wires hover details, feature
// dashboards on click and the pinned subgraph. All graph text is set with textContent, never as markup.
(function () {
  "use strict";
  var SVG = "http://www.w3.org/2000/svg";
  var ROW_H = 64, SPACING = 16, MIN_COL = 84, LEFT = 70, TOP = 28, BOTTOM = 70, RIGHT = 24, R = 6;

  var data = JSON.parse(document.getElementById("graph-data").textContent);
  var nodes = data.nodes, links = data.links, tokens = data.metadata.prompt_tokens || [];
  var byId = {};
  nodes.forEach(function (n) { byId[n.node_id] = n; n.edges = []; });
  var svg = document.getElementById("graph");
  var tooltip = document.getElementById("tooltip");
  var pinned = [];
  var selected = null;

  // ---- layout -----------------------------------------------------------------------------------------
  // Rows: embeddings, every model layer 0..L-1, logits. Columns: positions, wide enough for their fullest cell.
  var maxLayer = -1, logitRow = null, nPos = tokens.length;
  nodes.forEach(function (n) {
    if (n.kind === "logit") { logitRow = logitRow === null ? n.row : Math.max(logitRow, n.row); }
    else { maxLayer = Math.max(maxLayer, n.row); }
    nPos = Math.max(nPos, n.ctx_idx + 1);
  });
  if (logitRow !== null) { maxLayer = Math.max(maxLayer, logitRow - 2); }
  var rows = [{ key: "E", label: "Emb" }];
  for (var l = 0; l <= maxLayer; l++) { rows.push({ key: String(l), label: "L" + l }); }
  if (logitRow !== null) { rows.push({ key: "logit", label: "Logits" }); }
  var rowIndex = {};
  rows.forEach(function (r, i) { rowIndex[r.key] = i; });
  function rowKey(n) {
    return n.kind === "embedding" ? "E" : n.kind === "logit" ? "logit" : String(n.row);
  }

  var cells = {};
  nodes.forEach(function (n) {
    var key = rowKey(n) + "/" + n.ctx_idx;
    (cells[key] = cells[key] || []).push(n);
  });
  var widest = [];
  for (var p = 0; p < nPos; p++) { widest.push(1); }
  Object.keys(cells).forEach(function (key) {
    var cell = cells[key];
    cell.sort(function (a, b) {  // features by |influence| (strongest first), error nodes after them
      var ea = a.kind === "error" ? 1 : 0, eb = b.kind === "error" ? 1 : 0;
      return ea - eb || Math.abs(b.influence || 0) - Math.abs(a.influence || 0) ||
        (a.node_id < b.node_id ? -1 : 1);
    });
    widest[cell[0].ctx_idx] = Math.max(widest[cell[0].ctx_idx], cell.length);
  });
  var colX = [], x = LEFT;
  for (p = 0; p < nPos; p++) {
    var w = Math.max(MIN_COL, widest[p] * SPACING + 16);
    colX.push({ start: x, width: w });
    x += w;
  }
  var width = x + RIGHT, height = TOP + rows.length * ROW_H + BOTTOM;
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  svg.setAttribute("viewBox", "0 0 " + width + " " + height);
  function rowY(i) { return TOP + (rows.length - 1 - i) * ROW_H + ROW_H / 2; }
  Object.keys(cells).forEach(function (key) {
    var cell = cells[key], col = colX[cell[0].ctx_idx];
    var first = col.start + (col.width - cell.length * SPACING) / 2 + SPACING / 2;
    cell.forEach(function (n, i) {
      n.x = first + i * SPACING;
      n.y = rowY(rowIndex[rowKey(n)]);
    });
  });

  // ---- drawing ----------------------------------------------------------------------------------------
  function el(name, attrs, parent) {
    var e = document.createElementNS(SVG, name);
    Object.keys(attrs).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    if (parent) { parent.appendChild(e); }
    return e;
  }
  var grid = el("g", { "class": "grid" }, svg);
  rows.forEach(function (r, i) {
    var y = rowY(i);
    el("line", { x1: LEFT, x2: width - RIGHT, y1: y, y2: y, "class": "row-line" }, grid);
    el("text", { x: 8, y: y + 4, "class": "row-label" }, grid).textContent = r.label;
  });
  var baseY = rowY(0) + ROW_H / 2 + 14;
  colX.forEach(function (col, pos) {
    if (pos > 0) {
      el("line", { x1: col.start, x2: col.start, y1: TOP, y2: baseY - 12, "class": "col-line" }, grid);
    }
    var label = el("text", { x: col.start + col.width / 2, y: baseY, "class": "token-label",
                             "data-pos": pos }, grid);
    var text = pos < tokens.length ? visible(tokens[pos]) : "", fits = Math.floor((col.width - 6) / 7.3);
    el("tspan", {}, label).textContent = text.length > fits ? text.slice(0, fits - 1) + "\u2026" : text;
    el("title", {}, label).textContent = text;  // the whole token on hover
    el("text", { x: col.start + col.width / 2, y: baseY + 16, "class": "pos-label" }, grid).textContent =
      String(pos);
  });

  var maxW = 0;
  links.forEach(function (k) { maxW = Math.max(maxW, Math.abs(k.weight)); });
  var edgeLayer = el("g", { "class": "edges" }, svg);
  links.slice().sort(function (a, b) { return Math.abs(a.weight) - Math.abs(b.weight); })
    .forEach(function (k) {
      var s = byId[k.source], t = byId[k.target], rel = maxW > 0 ? Math.abs(k.weight) / maxW : 0;
      var g = el("g", { "class": "edge " + (k.weight >= 0 ? "pos" : "neg"), "data-source": k.source,
                        "data-target": k.target, "data-weight": k.weight }, edgeLayer);
      el("line", { x1: s.x, y1: s.y, x2: t.x, y2: t.y, "class": "hit" }, g);
      el("line", { x1: s.x, y1: s.y, x2: t.x, y2: t.y, "class": "stroke",
                   "stroke-width": (0.6 + 3.4 * Math.sqrt(rel)).toFixed(2),
                   "stroke-opacity": (0.3 + 0.6 * rel).toFixed(3) }, g);
      k.el = g;
      s.edges.push(k);
      if (t !== s) { t.edges.push(k); }
      g.addEventListener("mouseenter", function (ev) { showTip(ev, edgeRows(k)); });
      g.addEventListener("mousemove", moveTip);
      g.addEventListener("mouseleave", hideTip);
    });

  var nodeLayer = el("g", { "class": "nodes" }, svg);
  nodes.forEach(function (n) {
    var shape;
    if (n.kind === "feature") {
      shape = el("circle", { cx: n.x, cy: n.y, r: R }, null);
    } else if (n.kind === "error") {
      shape = el("rect", { x: n.x - R, y: n.y - R, width: 2 * R, height: 2 * R }, null);
    } else if (n.kind === "embedding") {
      shape = el("path", { d: "M" + n.x + " " + (n.y - R - 1) + " l" + (R + 1) + " " + (R + 1) + " l" +
                              (-R - 1) + " " + (R + 1) + " l" + (-R - 1) + " " + (-R - 1) + " z" }, null);
    } else {
      shape = el("path", { d: "M" + n.x + " " + (n.y - R - 1) + " l" + (R + 1) + " " + (2 * R + 1) + " h" +
                              (-2 * R - 2) + " z" }, null);
    }
    shape.setAttribute("class", "node " + n.kind + (n.is_target_logit ? " target" : "") +
                       (data.dashboards[n.node_id] ? " has-dashboard" : ""));
    shape.setAttribute("data-id", n.node_id);
    shape.setAttribute("tabindex", "0");
    nodeLayer.appendChild(shape);
    n.el = shape;
    shape.addEventListener("mouseenter", function (ev) { focus(n, true); showTip(ev, nodeRows(n)); });
    shape.addEventListener("mousemove", moveTip);
    shape.addEventListener("mouseleave", function () { focus(n, false); hideTip(); });
    shape.addEventListener("click", function (ev) {
      if (ev.shiftKey) { togglePin(n.node_id); } else { select(n); }
    });
  });

  // ---- details ----------------------------------------------------------------------------------------
  function visible(s) { return String(s).replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5"); }
  function num(v) { return typeof v === "number" ? v.toPrecision(4) : "\u2013"; }
  function label(n) {
    if (n.kind === "feature") {
      return "L" + n.layer + " F" + (n.feature_index === null ? n.feature : n.feature_index) + " @" + n.ctx_idx;
    }
    if (n.kind === "error") { return "error L" + n.layer + " @" + n.ctx_idx; }
    if (n.kind === "embedding") { return "emb " + visible(tokens[n.ctx_idx] || "") + " @" + n.ctx_idx; }
    return n.clerp ? n.clerp : "logit " + n.feature;
  }
  function nodeRows(n) {
    var out = [["node", n.node_id], ["kind", n.kind], ["layer", n.layer],
               ["pos", n.ctx_idx + (n.ctx_idx < tokens.length ? " " + visible(tokens[n.ctx_idx]) : "")]];
    if (n.kind === "feature") {
      out.push(["feature", n.feature_index === null ? n.feature : n.feature_index]);
      out.push(["activation", num(n.activation)]);
    }
    if (n.kind === "logit") { out.push(["token prob", num(n.token_prob)]); }
    out.push(["influence", num(n.influence)]);
    if (n.clerp) { out.push(["label", n.clerp]); }
    return out;
  }
  function edgeRows(k) {
    return [["edge", k.source + " \u2192 " + k.target], ["from", label(byId[k.source])],
            ["to", label(byId[k.target])], ["weight", num(k.weight)]];
  }
  function table(rowsOut) {
    var t = document.createElement("table");
    rowsOut.forEach(function (r) {
      var tr = t.insertRow(), a = tr.insertCell(), b = tr.insertCell();
      a.textContent = r[0];
      b.textContent = String(r[1]);
    });
    return t;
  }
  function showTip(ev, rowsOut) {
    tooltip.replaceChildren(table(rowsOut));
    tooltip.hidden = false;
    moveTip(ev);
  }
  function moveTip(ev) {
    tooltip.style.left = (ev.pageX + 14) + "px";
    tooltip.style.top = (ev.pageY + 14) + "px";
  }
  function hideTip() { tooltip.hidden = true; }
  function focus(n, on) {
    svg.classList.toggle("focus", on);
    n.edges.forEach(function (k) { k.el.classList.toggle("hl", on); });
  }

  var detailsBody = document.getElementById("details-body");
  var pinButton = document.getElementById("pin-button");
  var dashBody = document.getElementById("dashboard-body");
  function select(n) {
    if (selected) { selected.el.classList.remove("selected"); }
    selected = n;
    n.el.classList.add("selected");
    detailsBody.replaceChildren(table(nodeRows(n)));
    pinButton.disabled = false;
    updatePinButton();
    if (n.kind !== "feature") { return; }
    var head = document.createElement("p");
    head.className = "dash-head";
    head.textContent = label(n);
    var id = data.dashboards[n.node_id], tpl = id ? document.getElementById(id) : null;
    if (tpl) {
      dashBody.replaceChildren(head, tpl.content.cloneNode(true));
      shadeDashboards();
    } else {
      var none = document.createElement("p");
      none.textContent = "No dashboard was given for this feature.";
      dashBody.replaceChildren(head, none);
    }
    dashBody.dataset.node = n.node_id;
  }

  // ---- pinned subgraph --------------------------------------------------------------------------------
  var list = document.getElementById("pinned");
  var onlyPinned = document.getElementById("only-pinned");
  function togglePin(id) {
    var i = pinned.indexOf(id);
    if (i >= 0) { pinned.splice(i, 1); } else { pinned.push(id); }
    renderPins();
  }
  function updatePinButton() {
    pinButton.textContent = selected && pinned.indexOf(selected.node_id) >= 0 ? "Unpin" : "Pin";
  }
  function renderPins() {
    var set = {};
    pinned.forEach(function (id) { set[id] = true; });
    list.replaceChildren.apply(list, pinned.map(function (id) {
      var li = document.createElement("li");
      li.dataset.id = id;
      li.textContent = id + "  " + label(byId[id]);
      li.addEventListener("click", function () { select(byId[id]); });
      return li;
    }));
    document.getElementById("pin-count").textContent = String(pinned.length);
    document.getElementById("pinned-ids").textContent = pinned.join(",");
    nodes.forEach(function (n) {
      n.el.classList.toggle("pinned", !!set[n.node_id]);
      n.el.classList.toggle("out", onlyPinned.checked && !set[n.node_id]);
    });
    links.forEach(function (k) {
      k.el.classList.toggle("out", onlyPinned.checked && !(set[k.source] && set[k.target]));
    });
    updatePinButton();
  }
  pinButton.addEventListener("click", function () { if (selected) { togglePin(selected.node_id); } });
  document.getElementById("clear-pins").addEventListener("click", function () {
    pinned = [];
    renderPins();
  });
  onlyPinned.addEventListener("change", renderPins);

  (data.qParams.pinnedIds || []).forEach(function (id) { if (pinned.indexOf(id) < 0) { pinned.push(id); } });
  renderPins();
  if (data.qParams.clickedId) { select(byId[data.qParams.clickedId]); }
})();
