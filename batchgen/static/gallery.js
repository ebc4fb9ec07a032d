// The gallery's script: the jobs come from gallery-data.js (a global holding chunks of records);
// search, filters and sorting make a list of job indices from the data, and only the cards of the
// rows in view (and two rows either side) are in the page. Every text is set as textContent, never
// as markup: what the manifest or the API says is shown, never run.
(function () {
  'use strict';
  var grid = document.getElementById('grid');
  var config = JSON.parse(grid.dataset.config);
  var F = {};
  config.fields.forEach(function (name, i) { F[name] = i; });
  var jobs = [];
  (window[config.global] || []).forEach(function (chunk) {
    for (var i = 0; i < chunk.length; i++) { jobs.push(chunk[i]); }
  });
  // Lower-cased once: a search runs over 100,000 of these in milliseconds.
  var haystack = jobs.map(function (j) {
    return ((j[F.prompt] || '') + '\n' + j[F.key] + '\n' + (j[F.name] || '')).toLowerCase();
  });
  var CARD_H = 440, GAP = 16, MIN_W = 300, BUFFER_ROWS = 2;
  var buttons = Array.prototype.slice.call(document.querySelectorAll('.filters button'));
  var search = document.getElementById('search');
  var sort = document.getElementById('sort');
  var none = document.getElementById('none');
  var shown = document.getElementById('shown');
  var state = 'all';
  var view = [];         // indices into jobs, in the order shown
  var live = new Map();  // index into view -> card element in the page
  var cols = 1, cardW = MIN_W;

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) { e.className = cls; }
    if (text !== undefined && text !== null) { e.textContent = text; }
    return e;
  }

  function card(job) {
    var c = el('article', 'card');
    c.dataset.state = job[F.state];
    c.dataset.key = job[F.key];
    var outputs = job[F.outputs], inputs = job[F.inputs];
    var media = el('div', 'media');
    if (outputs.length) {
      outputs.forEach(function (o) {
        if (o[0] === null) { media.appendChild(el('div', 'placeholder', 'output not downloaded yet')); return; }
        var m;
        if (o[1]) {
          m = el('img', 'output'); m.alt = 'output ' + o[2]; m.loading = 'lazy';
        } else {
          m = el('video', 'output');
          m.controls = true; m.muted = true; m.loop = true; m.playsInline = true; m.preload = 'metadata';
          m.addEventListener('mouseenter', function () { var p = m.play(); if (p) { p.catch(function () {}); } });
          m.addEventListener('mouseleave', function () { m.pause(); });
        }
        m.setAttribute('src', o[0]);
        media.appendChild(m);
      });
    } else {
      media.className = 'media no-output';
      if (inputs.length) {
        var i = el('img'); i.alt = 'input image'; i.referrerPolicy = 'no-referrer'; i.setAttribute('src', inputs[0]);
        media.appendChild(i);
      }
      media.appendChild(el('span', 'veil', job[F.state]));
    }
    c.appendChild(media);
    var body = el('div', 'body');
    var head = el('div', 'head');
    head.appendChild(el('span', 'badge state-' + job[F.state], job[F.state]));
    if (config.simulated) { head.appendChild(el('span', 'badge sim', 'simulated')); }
    head.appendChild(el('span', 'seq', '#' + (job[F.seq] + 1)));
    if (job[F.name]) { head.appendChild(el('code', 'name', job[F.name])); }
    head.appendChild(el('code', 'key', job[F.key]));
    body.appendChild(head);
    if (inputs.length) {
      var row = el('div', 'inputs');
      row.appendChild(el('span', 'label', 'input'));
      inputs.forEach(function (u) {
        var a = el('a'); a.setAttribute('href', u);
        var t = el('img'); t.alt = 'input image'; t.referrerPolicy = 'no-referrer'; t.setAttribute('src', u);
        a.appendChild(t); row.appendChild(a);
      });
      body.appendChild(row);
    }
    if (job[F.prompt]) { body.appendChild(el('p', 'prompt', job[F.prompt])); }
    var settings = job[F.settings];
    if (settings.length) {
      var dl = el('dl', 'settings');
      settings.forEach(function (kv) {
        var d = el('div'); d.appendChild(el('dt', null, kv[0])); d.appendChild(el('dd', null, kv[1]));
        dl.appendChild(d);
      });
      body.appendChild(dl);
    }
    if (job[F.error]) { body.appendChild(el('p', 'error', job[F.error])); }
    body.appendChild(el('p', 'facts', job[F.facts]));
    c.appendChild(body);
    return c;
  }

  function layout() {
    var width = grid.clientWidth;
    cols = Math.max(1, Math.floor((width + GAP) / (MIN_W + GAP)));
    cardW = (width - GAP * (cols - 1)) / cols;
    var rows = Math.ceil(view.length / cols);
    grid.style.height = (rows ? rows * (CARD_H + GAP) - GAP : 0) + 'px';
  }

  function clear() {
    live.forEach(function (c) { c.remove(); });
    live.clear();
  }

  function render() {
    var top = grid.getBoundingClientRect().top;
    var first = Math.max(0, Math.floor(-top / (CARD_H + GAP)) - BUFFER_ROWS);
    var last = Math.floor((window.innerHeight - top) / (CARD_H + GAP)) + BUFFER_ROWS;
    var from = first * cols, to = Math.min(view.length, (last + 1) * cols);
    live.forEach(function (c, i) {
      if (i < from || i >= to) {
        c.querySelectorAll('video').forEach(function (v) { v.pause(); v.removeAttribute('src'); v.load(); });
        c.remove(); live.delete(i);
      }
    });
    for (var i = from; i < to; i++) {
      if (live.has(i)) { continue; }
      var c = card(jobs[view[i]]);
      var r = Math.floor(i / cols), k = i % cols;
      c.style.top = r * (CARD_H + GAP) + 'px';
      c.style.left = k * (cardW + GAP) + 'px';
      c.style.width = cardW + 'px';
      grid.appendChild(c);
      live.set(i, c);
    }
  }

  var ORDERS = {
    seq: null,
    state: function (a, b) { return jobs[a][F.state] < jobs[b][F.state] ? -1 : jobs[a][F.state] > jobs[b][F.state] ? 1 : a - b; },
    run: function (a, b) { return (jobs[b][F.run_s] || 0) - (jobs[a][F.run_s] || 0) || a - b; },
    key: function (a, b) { return jobs[a][F.key] < jobs[b][F.key] ? -1 : jobs[a][F.key] > jobs[b][F.key] ? 1 : 0; }
  };

  function apply() {
    var q = search.value.trim().toLowerCase();
    view = [];
    for (var i = 0; i < jobs.length; i++) {
      if ((state === 'all' || jobs[i][F.state] === state) && (!q || haystack[i].indexOf(q) >= 0)) { view.push(i); }
    }
    var order = ORDERS[sort.value];
    if (order) { view.sort(order); }
    none.hidden = view.length > 0 || jobs.length === 0;
    shown.textContent = view.length === jobs.length ? '' : view.length + ' shown';
    clear();
    layout();
    render();
  }

  buttons.forEach(function (b) {
    b.addEventListener('click', function () {
      state = b.dataset.filter;
      buttons.forEach(function (o) { o.setAttribute('aria-pressed', String(o === b)); });
      apply();
    });
  });
  search.addEventListener('input', apply);
  sort.addEventListener('change', apply);
  var pending = false;
  window.addEventListener('scroll', function () {
    if (pending) { return; }
    pending = true;
    requestAnimationFrame(function () { pending = false; render(); });
  }, {passive: true});
  window.addEventListener('resize', function () { clear(); layout(); render(); });
  if (!jobs.length) { grid.appendChild(el('p', 'empty', 'This batch has no jobs.')); grid.style.height = 'auto'; return; }
  apply();
})();
