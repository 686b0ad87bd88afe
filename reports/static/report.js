/* auditkit report, on screen: sortable and filterable tables. Inline, allowed by its hash in the
   page's Content-Security-Policy; no network, no library. A row with class "rationale" belongs to
   the row above it and moves and hides with it. */
(function () {
  "use strict";
  var each = function (list, fn) { Array.prototype.forEach.call(list, fn); };

  function groups(body) {
    var out = [];
    each(body.rows, function (row) {
      if (row.classList.contains("rationale") && out.length) { out[out.length - 1].push(row); } else { out.push([row]); }
    });
    return out;
  }

  function text(row, index) {
    var cell = row.cells[index];
    if (!cell) { return ""; }
    var value = cell.getAttribute("data-sort");
    return (value !== null ? value : cell.textContent).trim();
  }

  function number(value) {
    var match = value.replace(/[,\u2009\u202f ]/g, "").match(/^[<>\u2264\u2265]?(-?\d+(?:\.\d+)?(?:e[-+]?\d+)?)/i);
    return match ? parseFloat(match[1]) : NaN;
  }

  function blank(value) { return value === "" || value === "\u2014"; }

  function sortBy(table, heads, index) {
    var head = heads[index];
    var ascending = head.getAttribute("aria-sort") !== "ascending";
    each(heads, function (other) { other.removeAttribute("aria-sort"); });
    head.setAttribute("aria-sort", ascending ? "ascending" : "descending");
    var body = table.tBodies[0];
    var rows = groups(body);
    var numeric = rows.every(function (group) {
      var value = text(group[0], index);
      return blank(value) || !isNaN(number(value));
    });
    rows.sort(function (a, b) {
      var x = text(a[0], index);
      var y = text(b[0], index);
      if (blank(x) !== blank(y)) { return blank(x) ? 1 : -1; } // empty cells last, either way
      var order = numeric ? number(x) - number(y)
        : x.localeCompare(y, undefined, { numeric: true, sensitivity: "base" });
      return ascending ? order : -order;
    });
    rows.forEach(function (group) { group.forEach(function (row) { body.appendChild(row); }); });
  }

  each(document.querySelectorAll("table.sortable"), function (table) {
    if (!table.tHead || !table.tBodies.length) { return; }
    var heads = table.tHead.rows[table.tHead.rows.length - 1].cells;
    each(heads, function (head, index) {
      head.tabIndex = 0;
      head.title = "Sort by this column";
      head.addEventListener("click", function () { sortBy(table, heads, index); });
      head.addEventListener("keydown", function (event) {
        if (event.key === "Enter" || event.key === " ") { event.preventDefault(); sortBy(table, heads, index); }
      });
    });
  });

  each(document.querySelectorAll("input.table-filter"), function (input) {
    var table = document.getElementById(input.getAttribute("data-table"));
    var counter = document.getElementById(input.getAttribute("data-count"));
    if (!table || !table.tBodies.length) { return; }
    input.addEventListener("input", function () {
      var query = input.value.trim().toLowerCase();
      var shown = 0;
      var rows = groups(table.tBodies[0]);
      rows.forEach(function (group) {
        var words = group.map(function (row) { return row.textContent; }).join(" ").toLowerCase();
        var hide = query !== "" && words.indexOf(query) < 0;
        group.forEach(function (row) { row.hidden = hide; });
        if (!hide) { shown += 1; }
      });
      if (counter) { counter.textContent = query ? shown + " of " + rows.length + " shown" : ""; }
    });
  });
})();
