/*
 * Trellis console: the browser side.
 *
 * A plain script (no modules, no build step). It draws five views, chosen by the
 * URL's hash:
 *
 *   #/graph                        the service graph            (polls /api/graph every 2 s)
 *   #/traces                       trace search                 (searches on submit only)
 *   #/traces/<trace_id>?span=<id>  one trace as a waterfall, with its access-log lines
 *   #/metrics                      time-series charts           (polls /api/metrics every 2 s)
 *   #/config                       findings, proxies, resources (polls /api/config every 2 s)
 *
 * Libraries (vendored, see vendor/README.md): cytoscape + cytoscape-dagre for the
 * graph, uPlot for the charts.
 *
 * For automated tests the page exposes:
 *   - data-testid attributes on everything a test looks for;
 *   - document.body.dataset.ready = "<view>" once a view's data has been rendered
 *     (set again after every refresh, with document.body.dataset.readySeq counting up);
 *   - window.trellisGraph, the cytoscape instance of the graph view;
 *   - window.trellisApiErrors, the last failed API calls.
 */
'use strict';

(function () {
  // ---------------------------------------------------------------------------
  // Small DOM helpers
  // ---------------------------------------------------------------------------

  const $ = (selector, root = document) => root.querySelector(selector);

  /**
   * Creates an element. `attrs` maps attribute names to values; `class` and `text`
   * are shortcuts, `on<event>` keys add listeners, null/undefined/false values are
   * skipped. Children may be nodes, strings, numbers or (nested) arrays of them.
   */
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === 'class') el.className = value;
      else if (key === 'text') el.textContent = value;
      else if (key === 'style' && typeof value === 'object') Object.assign(el.style, value);
      else if (key.startsWith('on') && typeof value === 'function') el.addEventListener(key.slice(2), value);
      else if (value === true) el.setAttribute(key, '');
      else el.setAttribute(key, String(value));
    }
    append(el, children);
    return el;
  }

  function append(el, children) {
    for (const child of [children].flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : String(child));
    }
    return el;
  }

  /** Replaces the children of `el` (same kinds of children as h() takes). */
  function fill(el, ...children) {
    el.replaceChildren();
    return append(el, children);
  }

  /** A <select> with `options` given as [value, label] pairs. */
  function select(attrs, options, selected) {
    const el = h('select', attrs);
    setOptions(el, options, selected);
    return el;
  }

  /** Replaces the options of a <select>, keeping `selected` chosen when it is still there. */
  function setOptions(el, options, selected) {
    el.replaceChildren(...options.map(([value, label]) => h('option', { value }, label)));
    if (selected !== undefined && options.some(([value]) => value === String(selected))) el.value = String(selected);
  }

  /** A two-column key/value table; rows whose value is undefined are left out. */
  function kvTable(rows, attrs) {
    const table = h('table', Object.assign({ class: 'kv' }, attrs));
    for (const [key, value] of rows) {
      if (value === undefined) continue;
      table.append(h('tr', {}, h('th', {}, key), h('td', {}, value)));
    }
    return table;
  }

  function badge(text, kind, attrs) {
    return h('span', Object.assign({ class: `badge badge-${kind}` }, attrs), text);
  }

  const enc = encodeURIComponent;

  function go(hash) {
    location.hash = hash;
  }

  // ---------------------------------------------------------------------------
  // Formatting
  // ---------------------------------------------------------------------------

  const DASH = '–';
  const FONT = 'system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif';
  const measureCtx = document.createElement('canvas').getContext('2d');

  /** Width in pixels of `text` drawn in `font` (labels of graph nodes, chart axes). */
  function textWidth(text, font) {
    measureCtx.font = font;
    return measureCtx.measureText(text).width;
  }

  const fmt = {
    /** Requests per second: more decimals for small rates. */
    rps(v) {
      if (v === null || v === undefined || Number.isNaN(v)) return DASH;
      if (v >= 100) return v.toFixed(0);
      if (v >= 10) return v.toFixed(1);
      return v.toFixed(2);
    },
    /** A fraction (0..1) as a percentage. */
    pct(frac) {
      if (frac === null || frac === undefined || Number.isNaN(frac)) return DASH;
      const p = frac * 100;
      if (p === 0) return '0%';
      if (p < 1) return p.toFixed(2) + '%';
      if (p < 10) return p.toFixed(1) + '%';
      return p.toFixed(0) + '%';
    },
    /** A share of traffic (0..1): whole percents unless under 1%. */
    share(frac) {
      if (frac === null || frac === undefined) return DASH;
      const p = frac * 100;
      return (p > 0 && p < 1 ? p.toFixed(1) : p.toFixed(0)) + '%';
    },
    ms(v) {
      if (v === null || v === undefined || Number.isNaN(v)) return DASH;
      if (v < 1) return v.toFixed(2) + ' ms';
      if (v < 100) return v.toFixed(1) + ' ms';
      if (v < 10000) return v.toFixed(0) + ' ms';
      return (v / 1000).toFixed(1) + ' s';
    },
    us(v) {
      return v === null || v === undefined ? DASH : fmt.ms(v / 1000);
    },
    bytes(v) {
      if (v === null || v === undefined || Number.isNaN(v)) return DASH;
      const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
      let i = 0;
      while (Math.abs(v) >= 1024 && i < units.length - 1) {
        v /= 1024;
        i++;
      }
      return (i === 0 ? v.toFixed(0) : v < 10 ? v.toFixed(1) : v.toFixed(0)) + ' ' + units[i];
    },
    /** Mebibytes with one decimal, for the stores indicator. */
    mib(v) {
      const m = (v || 0) / (1024 * 1024);
      return Number.isInteger(m) ? String(m) : m.toFixed(1);
    },
    seconds(s) {
      if (s === null || s === undefined) return DASH;
      if (s < 60) return s.toFixed(0) + ' s';
      if (s < 3600) return (s / 60).toFixed(0) + ' min';
      if (s < 86400) return (s / 3600).toFixed(1) + ' h';
      return (s / 86400).toFixed(1) + ' d';
    },
    /** Local wall-clock time of a timestamp in microseconds: HH:MM:SS.mmm */
    timeUs(us) {
      if (!us) return DASH;
      const d = new Date(us / 1000);
      const pad = (n, w = 2) => String(n).padStart(w, '0');
      return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
    },
    dateTimeUs(us) {
      return us ? new Date(us / 1000).toLocaleString() : DASH;
    },
    clock() {
      return new Date().toLocaleTimeString();
    },
  };

  /** A colour for a service name, the same every time (used for span bars). */
  function serviceColor(name) {
    let hash = 0;
    for (const ch of String(name)) hash = (hash * 31 + ch.charCodeAt(0)) | 0;
    const hue = ((hash % 360) + 360) % 360;
    return `hsl(${hue}, 55%, 55%)`;
  }

  // Chart axes: short tick labels, and an axis as wide as its widest label.
  const axisValue = {
    plain: (v) => (v === null ? '' : String(+v.toFixed(2))),
    ms: (v) => (v === null ? '' : v === 0 ? '0' : v >= 1000 ? +(v / 1000).toFixed(2) + ' s' : +v.toFixed(2) + ' ms'),
  };

  function axisSize(u, values, axisIdx, cycleNum) {
    const axis = u.axes[axisIdx];
    // After the second measuring pass, keep the size so that the layout settles.
    if (cycleNum > 1) return axis._size;
    let width = 0;
    for (const v of values || []) width = Math.max(width, textWidth(v, `11px ${FONT}`));
    return Math.ceil(width) + 16;
  }

  // Colours shared by the graph and the badges (same values as in app.css).
  const COLOR = {
    text: '#1b2130',
    muted: '#5f6b7a',
    accent: '#2563c9',
    ok: '#1a8f4c',
    warn: '#d07b00',
    err: '#d0302a',
    border: '#c4cad4',
  };

  /** Green with no errors, orange under 5%, red from 5%. */
  function errorColor(rate) {
    if (!rate || rate <= 0) return COLOR.ok;
    if (rate < 0.05) return COLOR.warn;
    return COLOR.err;
  }

  // ---------------------------------------------------------------------------
  // API access, with a record of failures for the error strip and for tests
  // ---------------------------------------------------------------------------

  /** The last failed calls, newest last (read by the browser-driven tests). */
  const apiErrors = [];
  window.trellisApiErrors = apiErrors;
  /** Failures still current, by endpoint path (cleared when that endpoint answers again). */
  const currentErrors = new Map();

  function endpointOf(url) {
    return url.split('?')[0].replace(/^\/api\/traces\/.+$/, '/api/traces/<id>');
  }

  function recordError(url, status, message) {
    const entry = { url, status, message, time: new Date().toISOString() };
    apiErrors.push(entry);
    if (apiErrors.length > 20) apiErrors.shift();
    currentErrors.set(endpointOf(url), entry);
    renderErrorStrip();
  }

  function clearError(url) {
    if (currentErrors.delete(endpointOf(url))) renderErrorStrip();
  }

  function renderErrorStrip() {
    const strip = $('[data-testid="api-error"]');
    const errors = [...currentErrors.values()];
    strip.hidden = errors.length === 0;
    if (!errors.length) return;
    const last = errors[errors.length - 1];
    strip.textContent = `⚠ ${endpointOf(last.url)}: ${last.status ? 'HTTP ' + last.status : 'no answer'}` +
      (errors.length > 1 ? ` (+${errors.length - 1} more)` : '');
    strip.title = errors.map((e) => `${e.time} ${e.url}: ${e.status || ''} ${e.message}`).join('\n');
  }

  class ApiError extends Error {
    constructor(url, status, message) {
      super(`${url}: ${status ? 'HTTP ' + status + ' ' : ''}${message}`);
      this.status = status;
    }
  }

  /**
   * GETs JSON from the console's API. With `allow404`, a 404 answers null instead of
   * failing (used for a trace that is not, or no longer, stored).
   */
  async function api(url, { allow404 = false } = {}) {
    let res;
    try {
      res = await fetch(url, { headers: { Accept: 'application/json' }, cache: 'no-store' });
    } catch (e) {
      recordError(url, 0, e.message);
      throw new ApiError(url, 0, e.message);
    }
    if (res.status === 404 && allow404) {
      clearError(url);
      return null;
    }
    const text = await res.text().catch(() => '');
    if (!res.ok) {
      const message = text.slice(0, 300) || res.statusText;
      recordError(url, res.status, message);
      throw new ApiError(url, res.status, message);
    }
    try {
      const data = JSON.parse(text);
      clearError(url);
      return data;
    } catch (e) {
      recordError(url, res.status, 'not JSON: ' + e.message);
      throw new ApiError(url, res.status, 'not JSON');
    }
  }

  /** Builds "/api/x?a=1&b=2" from the non-empty entries of `params`. */
  function apiUrl(path, params) {
    const q = new URLSearchParams();
    for (const [key, value] of Object.entries(params || {})) {
      if (value !== '' && value !== null && value !== undefined) q.set(key, String(value));
    }
    const s = q.toString();
    return s ? `${path}?${s}` : path;
  }

  // ---------------------------------------------------------------------------
  // The "ready" signal for tests
  // ---------------------------------------------------------------------------

  let readySeq = 0;

  /** Tells that `view` has rendered fresh data. */
  function markReady(view) {
    document.body.dataset.ready = view;
    document.body.dataset.readySeq = String(++readySeq);
  }

  function clearReady() {
    delete document.body.dataset.ready;
  }

  // ---------------------------------------------------------------------------
  // View lifecycle and polling
  // ---------------------------------------------------------------------------

  /** What a mounted view owns: `alive` turns false when the user leaves it. */
  class ViewContext {
    constructor() {
      this.alive = true;
      this.cleanups = [];
      this.pollers = [];
    }
    onDestroy(fn) {
      this.cleanups.push(fn);
    }
    destroy() {
      this.alive = false;
      for (const fn of this.cleanups.splice(0)) {
        try {
          fn();
        } catch (e) {
          console.warn('cleanup failed', e);
        }
      }
    }
  }

  const POLL_MS = 2000;
  // The config view polls faster: an edit's finding (or a proxy's disconnection) shows within
  // about a second of the control plane seeing it.
  const CONFIG_POLL_MS = 1000;

  /**
   * Runs `fn` now, then again `ms` after each run finishes, while the view is
   * mounted. Runs are skipped while the tab is hidden and resume when it shows.
   * Returns { now() } to run it at once (e.g. after the user changed a selector).
   */
  function poll(ctx, fn, ms = POLL_MS) {
    let timer = null;
    let running = false;
    let again = false;
    async function tick() {
      clearTimeout(timer);
      timer = null;
      if (!ctx.alive) return;
      if (running) {
        again = true;
        return;
      }
      running = true;
      try {
        if (document.visibilityState !== 'hidden') await fn();
      } catch (e) {
        // API failures are already shown in the error strip.
        if (!(e instanceof ApiError)) console.error(e);
      }
      running = false;
      if (!ctx.alive) return;
      if (again) {
        again = false;
        tick();
      } else {
        timer = setTimeout(tick, ms);
      }
    }
    const poller = { now: tick };
    ctx.pollers.push(poller);
    ctx.onDestroy(() => clearTimeout(timer));
    tick();
    return poller;
  }

  document.addEventListener('visibilitychange', () => {
    if (document.visibilityState === 'visible' && current) current.ctx.pollers.forEach((p) => p.now());
    if (document.visibilityState === 'visible') statusPoller.now();
  });

  // ---------------------------------------------------------------------------
  // Routing
  // ---------------------------------------------------------------------------

  const views = {};
  let current = null; // { key, ctx, view }

  /** "#/traces/abc?span=x" → { view: 'trace', traceId: 'abc', params }. */
  function parseHash() {
    const raw = location.hash.replace(/^#\/?/, '');
    const q = raw.indexOf('?');
    const path = q >= 0 ? raw.slice(0, q) : raw;
    const params = new URLSearchParams(q >= 0 ? raw.slice(q + 1) : '');
    const parts = path.split('/').filter(Boolean);
    const name = parts[0] || 'graph';
    if (name === 'traces' && parts[1]) return { view: 'trace', traceId: decodeURIComponent(parts[1]), params };
    if (name in views && name !== 'trace') return { view: name, params };
    return { view: 'graph', params };
  }

  function route() {
    const r = parseHash();
    const key = r.view === 'trace' ? 'trace:' + r.traceId : r.view + '?' + r.params.toString();
    if (current) {
      // The same trace with another ?span= only moves the selection.
      if (r.view === 'trace' && current.key === key) {
        if (current.view.update) current.view.update(r);
        return;
      }
      if (current.key === key) return;
      // The same view with other parameters (e.g. a link to one service's traces).
      if (current.name === r.view && r.view !== 'trace' && current.view.update) {
        current.key = key;
        current.view.update(r);
        return;
      }
      current.ctx.destroy();
    }
    // Failures of the view we leave are no longer news; the stores indicator's stay.
    for (const endpoint of [...currentErrors.keys()]) if (endpoint !== '/api/status') currentErrors.delete(endpoint);
    renderErrorStrip();
    clearReady();
    const root = $('#view');
    root.replaceChildren();
    root.className = 'view view-' + r.view;
    const ctx = new ViewContext();
    current = { key, name: r.view, ctx, view: {} };
    current.view = views[r.view](root, ctx, r) || {};
    const tab = r.view === 'trace' ? 'traces' : r.view;
    document.querySelectorAll('.tabs a').forEach((a) => a.classList.toggle('active', a.dataset.tab === tab));
    document.title = `${tab[0].toUpperCase()}${tab.slice(1)} · Trellis console`;
  }

  // ---------------------------------------------------------------------------
  // Stores indicator (top bar)
  // ---------------------------------------------------------------------------

  const statusCtx = new ViewContext();
  const statusPoller = poll(statusCtx, async () => {
    const el = $('[data-testid="stores"]');
    const status = await api('/api/status');
    const parts = [];
    const tips = [];
    let warn = false;
    for (const s of status.stores || []) {
      const fill = s.limit_bytes ? s.bytes / s.limit_bytes : 0;
      if (fill >= 0.9) warn = true;
      parts.push(`${s.name} ${fmt.mib(s.bytes)}${s.limit_bytes ? '/' + fmt.mib(s.limit_bytes) : ''} MiB`);
      tips.push(`${s.name}: ${s.items} items, ${fmt.bytes(s.bytes)} of ${s.limit_bytes ? fmt.bytes(s.limit_bytes) : 'no limit'}` +
        `${s.limit_bytes ? ` (${fmt.pct(fill)})` : ''}, ${s.evicted} evicted`);
    }
    const scrape = status.scrape;
    if (scrape) {
      tips.push(`metrics scrape: every ${scrape.interval_seconds} s, ${scrape.targets} targets, ${scrape.failing} failing`);
      if (scrape.failing > 0) parts.push(`scrape ${scrape.failing}/${scrape.targets} failing`);
    }
    el.textContent = parts.join(' · ') || 'no stores';
    el.title = tips.join('\n');
    el.classList.toggle('warn', warn || (scrape && scrape.failing > 0));
  }, 5000);

  // ---------------------------------------------------------------------------
  // Graph view
  // ---------------------------------------------------------------------------

  const graphPrefs = { window: '60' }; // kept while switching views

  /** The label lines of a graph node: its name, and its version when it has one. */
  function nodeLabel(n) {
    if (n.kind === 'unknown') return ['unknown'];
    const lines = [n.name || n.id];
    if (n.version) lines.push(n.version);
    return lines;
  }

  function nodeName(n) {
    return n ? n.name || (n.kind === 'unknown' ? 'unknown' : n.id) : '?';
  }

  /** The edge label: "<rps> rps · <share>%" (+ errors) for requests, bytes/s for TCP. */
  function edgeLabel(e) {
    if (e.protocol === 'tcp') return e.bytes_per_second === null || e.bytes_per_second === undefined ? 'tcp' : `${fmt.bytes(e.bytes_per_second)}/s`;
    let label = `${fmt.rps(e.rps)} rps`;
    if (e.share !== null && e.share !== undefined && e.share < 0.9995) label += ` · ${fmt.share(e.share)}`;
    // The error rate goes on a second line, which the label's colour makes red.
    if (e.error_rate > 0) label += `\n${fmt.pct(e.error_rate)} errors`;
    return label;
  }

  function graphStyle() {
    return [
      {
        selector: 'node',
        style: {
          shape: 'round-rectangle',
          width: 'data(w)',
          height: 'data(h)',
          'background-color': '#ffffff',
          'border-width': 1.5,
          'border-color': 'data(border)',
          label: 'data(label)',
          'text-wrap': 'wrap',
          'text-valign': 'center',
          'text-halign': 'center',
          'font-family': FONT,
          'font-size': 12,
          'line-height': 1.25,
          color: COLOR.text,
        },
      },
      { selector: 'node[kind = "service"]', style: { shape: 'barrel', 'background-color': '#eaf1fc' } },
      { selector: 'node[kind = "unknown"]', style: { shape: 'ellipse', 'background-color': '#eef0f3', color: COLOR.muted } },
      // The root nodes (nothing calls them): entry points such as gateways.
      { selector: 'node.entry', style: { 'border-width': 2.5 } },
      {
        // App boxes grouping the versions of one app.
        selector: 'node[kind = "app"]',
        style: {
          shape: 'round-rectangle',
          'background-color': '#f3f5f8',
          'border-color': '#9aa4b2',
          'border-width': 1,
          'border-style': 'dashed',
          'text-valign': 'top',
          'text-halign': 'center',
          'text-margin-y': -3,
          'font-weight': 'bold',
          color: COLOR.muted,
          padding: 10,
        },
      },
      { selector: 'node:selected', style: { 'border-color': COLOR.accent, 'border-width': 3 } },
      {
        selector: 'edge',
        style: {
          'curve-style': 'bezier',
          width: 'data(width)',
          'line-color': 'data(color)',
          'target-arrow-color': 'data(color)',
          'target-arrow-shape': 'triangle',
          'arrow-scale': 0.9,
          label: 'data(label)',
          'font-family': FONT,
          'font-size': 11,
          'text-wrap': 'wrap',
          color: 'data(labelColor)',
          'text-background-color': '#ffffff',
          'text-background-opacity': 0.9,
          'text-background-padding': 2,
          'text-background-shape': 'round-rectangle',
          'text-events': 'yes',
        },
      },
      // Plaintext (no mTLS) edges are dashed; mTLS edges are solid.
      { selector: 'edge[!mtls]', style: { 'line-style': 'dashed', 'line-dash-pattern': [6, 4] } },
      {
        selector: 'edge:selected',
        style: { 'underlay-color': COLOR.accent, 'underlay-opacity': 0.25, 'underlay-padding': 5, 'z-index': 10 },
      },
    ];
  }

  views.graph = function graphView(root, ctx) {
    const state = {
      data: null,
      nodes: new Map(), // id → node from the API
      edges: new Map(), // id → edge from the API
      structure: '', // node ids and their parents: a change re-runs the layout
      selected: null, // { type: 'node' | 'edge', id }
      tracesBox: null, // the "Slowest traces" list of the selected edge
    };

    // --- layout of the view ---
    const windowSelect = select({ 'data-testid': 'graph-window', title: 'Traffic of the last …' },
      [['60', 'last 1 min'], ['300', 'last 5 min'], ['900', 'last 15 min'], ['3600', 'last 1 h']], graphPrefs.window);
    const summary = h('span', { class: 'muted', 'data-testid': 'graph-summary' }, 'loading…');
    const legend = h('div', { class: 'legend', 'data-testid': 'graph-legend' },
      h('span', {}, h('i', { class: 'sw-line', style: { borderColor: COLOR.ok } }), 'no errors'),
      h('span', {}, h('i', { class: 'sw-line', style: { borderColor: COLOR.warn } }), '< 5% errors'),
      h('span', {}, h('i', { class: 'sw-line', style: { borderColor: COLOR.err } }), '≥ 5% errors'),
      h('span', {}, h('i', { class: 'sw-line' }), 'mTLS'),
      h('span', {}, h('i', { class: 'sw-line dashed' }), 'plaintext'),
      h('span', {}, h('i', { class: 'sw-node' }), 'workload'),
      h('span', {}, h('i', { class: 'sw-node service' }), 'service'),
      h('span', {}, h('i', { class: 'sw-node group' }), 'app versions'));
    const toolbar = h('div', { class: 'toolbar' },
      windowSelect,
      h('button', { type: 'button', title: 'Fit the graph in the view', onclick: () => fitGraph() }, 'Fit'),
      h('button', { type: 'button', title: 'Lay the graph out again', onclick: () => runLayout() }, 'Re-layout'),
      summary, h('span', { class: 'spacer' }), legend);
    const canvas = h('div', { class: 'graph-canvas', 'data-testid': 'graph-canvas' });
    const empty = h('div', { class: 'empty graph-empty', hidden: true });
    const details = h('aside', { class: 'panel details', 'data-testid': 'details', 'data-kind': '' });
    // Hidden (to the eye, not to tests or screen readers) copies of the graph's edges and nodes.
    const edgeTable = h('table', { class: 'visually-hidden', 'data-testid': 'graph-edges' });
    const nodeList = h('ul', { class: 'visually-hidden', 'data-testid': 'graph-nodes' });
    root.append(
      h('div', { class: 'graph-layout' },
        h('section', { class: 'graph-main' }, toolbar, h('div', { class: 'graph-stage' }, canvas, empty)),
        details),
      edgeTable, nodeList);

    // --- cytoscape ---
    const cy = cytoscape({
      container: canvas,
      style: graphStyle(),
      minZoom: 0.2,
      maxZoom: 3,
      boxSelectionEnabled: false,
    });
    window.trellisGraph = cy;
    ctx.onDestroy(() => {
      if (window.trellisGraph === cy) window.trellisGraph = null;
      cy.destroy();
    });

    // Taps select; these handlers also run for a test's cy.getElementById(id).emit('tap').
    cy.on('tap', 'node', (evt) => selectElement({ type: 'node', id: evt.target.id() }));
    cy.on('tap', 'edge', (evt) => selectElement({ type: 'edge', id: evt.target.id() }));
    cy.on('tap', (evt) => {
      if (evt.target === cy) selectElement(null);
    });
    cy.on('mouseover', 'node, edge', () => { canvas.style.cursor = 'pointer'; });
    cy.on('mouseout', 'node, edge', () => { canvas.style.cursor = ''; });

    windowSelect.addEventListener('change', () => {
      graphPrefs.window = windowSelect.value;
      poller.now();
    });

    function fitGraph() {
      cy.fit(undefined, 24);
      // A small graph would be blown up: keep it at a readable size instead.
      if (cy.zoom() > 1.3) {
        cy.zoom(1.3);
        cy.center();
      }
    }

    function runLayout() {
      if (cy.nodes().empty()) return;
      let options = {
        name: 'dagre',
        rankDir: 'LR',
        nodeSep: 50,
        rankSep: 75,
        edgeSep: 12,
        fit: false,
        animate: false,
        // A stable order gives the same picture for the same graph.
        sort: (a, b) => (a.id() < b.id() ? -1 : a.id() > b.id() ? 1 : 0),
      };
      try {
        cy.layout(options).run();
      } catch (e) {
        // Without the dagre extension: the built-in layered layout, turned left-to-right.
        console.warn('dagre layout failed, using breadthfirst', e);
        const roots = cy.nodes('[kind != "app"]').filter((n) => n.incomers('edge').empty());
        options = {
          name: 'breadthfirst', directed: true, roots: roots.nonempty() ? roots : undefined, spacingFactor: 1.2,
          fit: false, animate: false, transform: (node, pos) => ({ x: pos.y * 1.6, y: pos.x }),
        };
        cy.layout(options).run();
      }
      fitGraph();
    }

    /** Puts fresh API data into cytoscape, keeping positions unless the set of nodes changed. */
    function applyGraph(data) {
      const nodes = data.nodes || [];
      const nodeIds = new Set(nodes.map((n) => n.id));
      const edgeIds = new Set();
      const edges = (data.edges || []).filter((e) => {
        // Cytoscape refuses an edge to a missing node or a second element with the same id.
        const ok = nodeIds.has(e.source) && nodeIds.has(e.target) && !edgeIds.has(e.id) && !nodeIds.has(e.id);
        if (!ok) console.warn('graph: skipping edge', e.id);
        edgeIds.add(e.id);
        return ok;
      });
      state.data = data;
      state.nodes = new Map(nodes.map((n) => [n.id, n]));
      state.edges = new Map(edges.map((e) => [e.id, e]));

      // Apps with two or more versions get a box around their workloads.
      const versions = new Map();
      for (const n of nodes) {
        if (n.kind !== 'workload' || !n.app) continue;
        const key = `${n.namespace}/${n.app}`;
        if (!versions.has(key)) versions.set(key, new Set());
        versions.get(key).add(n.version || '');
      }
      const groupOf = (n) => {
        const key = `${n.namespace}/${n.app}`;
        return n.kind === 'workload' && n.app && versions.get(key).size >= 2 ? 'app:' + key : undefined;
      };
      const hasIncoming = new Set(edges.map((e) => e.target));

      const elements = [];
      for (const key of [...versions.keys()].filter((k) => versions.get(k).size >= 2)) {
        elements.push({ group: 'nodes', data: { id: 'app:' + key, kind: 'app', label: key.split('/')[1], w: 10, h: 10, border: '#9aa4b2' } });
      }
      for (const n of nodes) {
        const lines = nodeLabel(n);
        const font = `12px ${FONT}`;
        const w = Math.max(...lines.map((l) => textWidth(l, font))) + 22;
        elements.push({
          group: 'nodes',
          classes: hasIncoming.has(n.id) ? '' : 'entry',
          data: {
            id: n.id, parent: groupOf(n), kind: n.kind, label: lines.join('\n'),
            w: Math.max(w, n.kind === 'unknown' ? 70 : 40), h: lines.length * 15 + 14,
            border: errorColor(n.error_rate_in),
          },
        });
      }
      for (const e of edges) {
        const color = errorColor(e.error_rate);
        elements.push({
          group: 'edges',
          data: {
            id: e.id, source: e.source, target: e.target, mtls: !!e.mtls, label: edgeLabel(e), color,
            labelColor: e.error_rate > 0 ? COLOR.err : COLOR.text,
            width: 1.5 + Math.min(3.5, Math.log10(1 + (e.rps || 0)) * 1.5),
          },
        });
      }

      const structure = elements.filter((el) => el.group === 'nodes').map((el) => `${el.data.id}<${el.data.parent || ''}`).sort().join('\n');
      if (structure !== state.structure) {
        // New or gone nodes: rebuild and lay out again.
        state.structure = structure;
        cy.batch(() => {
          cy.elements().remove();
          cy.add(elements);
        });
        runLayout();
      } else {
        // Same nodes: update figures in place, add and remove edges.
        const wanted = new Set(elements.map((el) => el.data.id));
        cy.batch(() => {
          cy.edges().filter((e) => !wanted.has(e.id())).remove();
          for (const el of elements) {
            const existing = cy.getElementById(el.data.id);
            if (existing.nonempty()) {
              // id, parent and ends cannot change through data(); they are the same here anyway.
              const { id, parent, source, target, ...figures } = el.data; // eslint-disable-line no-unused-vars
              existing.data(figures);
              if (el.group === 'nodes' && el.classes !== undefined) existing.classes(el.classes);
            } else {
              cy.add(el);
            }
          }
        });
      }
      if (state.selected) {
        const ele = cy.getElementById(state.selected.id);
        if (ele.nonempty() && !ele.selected()) ele.select();
      }
    }

    /** The hidden table and list that tests read. */
    function renderHidden() {
      fill(edgeTable, h('tr', {}, ['id', 'source', 'target', 'version', 'protocol', 'rps', 'share', 'error rate'].map((t) => h('th', {}, t))));
      for (const e of state.edges.values()) {
        const s = state.nodes.get(e.source);
        const t = state.nodes.get(e.target);
        edgeTable.append(h('tr', {
          'data-testid': 'graph-edge',
          'data-id': e.id,
          'data-source-id': e.source,
          'data-target-id': e.target,
          'data-source-name': nodeName(s),
          'data-source-version': s.version || '',
          'data-target-name': nodeName(t),
          'data-target-version': t.version || '',
          'data-target-namespace': t.namespace || '',
          'data-service': e.service || '',
          'data-rps': e.rps ?? '',
          'data-share': e.share ?? '',
          'data-error-rate': e.error_rate ?? '',
          'data-protocol': e.protocol || '',
          'data-bytes-per-second': e.bytes_per_second ?? '',
          'data-mtls': String(!!e.mtls),
        }, [e.id, nodeName(s), nodeName(t), t.version || '', e.protocol, e.rps, e.share, e.error_rate].map((v) => h('td', {}, v ?? ''))));
      }
      fill(nodeList, ...[...state.nodes.values()].map((n) => h('li', {
        'data-testid': 'graph-node',
        'data-id': n.id,
        'data-name': nodeName(n),
        'data-kind': n.kind,
        'data-namespace': n.namespace || '',
        'data-version': n.version || '',
        'data-rps-in': n.rps_in ?? '',
      }, `${n.kind} ${nodeName(n)} ${n.version || ''}`)));
    }

    // --- selection and the details panel ---

    function selectElement(sel) {
      const same = sel && state.selected && sel.id === state.selected.id;
      state.selected = sel;
      if (!same) state.tracesBox = null;
      cy.elements(':selected').filter((e) => !sel || e.id() !== sel.id).unselect();
      if (sel) {
        const ele = cy.getElementById(sel.id);
        if (ele.nonempty() && !ele.selected()) ele.select();
      }
      renderDetails();
    }

    function figureRows(e) {
      const rows = [
        ['Service', e.service || DASH],
        ['Protocol', e.protocol],
      ];
      if (e.protocol === 'tcp') {
        rows.push(['Bytes/s', e.bytes_per_second === null || e.bytes_per_second === undefined ? DASH : fmt.bytes(e.bytes_per_second) + '/s']);
      } else {
        rows.push(['Requests/s', fmt.rps(e.rps)]);
        rows.push(['Errors', h('span', { class: e.error_rate > 0 ? 'err' : '' }, fmt.pct(e.error_rate))]);
        rows.push(['Share', e.share === null || e.share === undefined ? DASH : `${fmt.share(e.share)} of the source's requests to this service`]);
        rows.push(['p50', fmt.ms(e.p50_ms)]);
        rows.push(['p99', fmt.ms(e.p99_ms)]);
        if (e.bytes_per_second !== null && e.bytes_per_second !== undefined) rows.push(['Bytes/s', fmt.bytes(e.bytes_per_second) + '/s']);
      }
      rows.push(['mTLS', e.mtls ? 'yes' : h('span', { class: 'warn' }, 'no (plaintext)')]);
      return rows;
    }

    function edgeLink(e, label) {
      return h('a', { href: '#', class: 'edge-link', onclick: (ev) => { ev.preventDefault(); selectElement({ type: 'edge', id: e.id }); } }, label);
    }

    function renderDetails() {
      const sel = state.selected;
      details.dataset.kind = sel ? sel.type : '';
      details.dataset.id = sel ? sel.id : '';
      const figures = h('div', { class: 'figures' });
      if (!sel) {
        figures.append(h('p', { class: 'muted' }, 'Click a node or an edge to see its figures.'),
          h('p', { class: 'muted small' }, 'Edge labels: requests per second, the share of the caller\'s requests to that service ' +
            'when traffic is split (canary), and the error rate. TCP edges show bytes per second. ' +
            'Solid edges use mTLS, dashed edges are plaintext.'));
      } else if (sel.type === 'edge') {
        const e = state.edges.get(sel.id);
        if (!e) {
          figures.append(h('p', { class: 'muted' }, 'This edge has no traffic in the window any more.'));
        } else {
          const s = state.nodes.get(e.source);
          const t = state.nodes.get(e.target);
          figures.append(
            h('h3', {}, h('span', { class: 'muted small' }, 'Edge '), `${nodeName(s)} → ${nodeName(t)}${t.version ? ' ' + t.version : ''}`),
            kvTable(figureRows(e), { 'data-testid': 'edge-figures' }));
        }
      } else {
        const n = state.nodes.get(sel.id);
        if (sel.id.startsWith('app:')) {
          const members = [...state.nodes.values()].filter((m) => 'app:' + m.namespace + '/' + m.app === sel.id);
          figures.append(h('h3', {}, h('span', { class: 'muted small' }, 'App '), sel.id.slice(4)),
            kvTable(members.map((m) => [m.version || m.name, `${fmt.rps(m.rps_in)} rps in · ${fmt.pct(m.error_rate_in)} errors`])));
        } else if (!n) {
          figures.append(h('p', { class: 'muted' }, 'This node has no traffic in the window any more.'));
        } else {
          const incoming = [...state.edges.values()].filter((e) => e.target === n.id);
          const outgoing = [...state.edges.values()].filter((e) => e.source === n.id);
          figures.append(
            h('h3', {}, h('span', { class: 'muted small' }, n.kind + ' '), nodeName(n), n.version ? ' ' + n.version : ''),
            kvTable([
              ['Namespace', n.namespace || DASH],
              ['App', n.app || DASH],
              ['Version', n.version || DASH],
              ['Requests/s in', fmt.rps(n.rps_in)],
              ['Errors in', h('span', { class: n.error_rate_in > 0 ? 'err' : '' }, fmt.pct(n.error_rate_in))],
            ], { 'data-testid': 'node-figures' }));
          const edgeList = (title, list, other) => list.length === 0 ? null : [
            h('h4', {}, title),
            h('ul', { class: 'plain' }, list.map((e) => h('li', {}, edgeLink(e, `${nodeName(state.nodes.get(e[other]))}${state.nodes.get(e[other]).version ? ' ' + state.nodes.get(e[other]).version : ''}`), ' ', h('span', { class: 'muted' }, edgeLabel(e).replace('\n', ' · '))))),
          ];
          append(figures, [edgeList('Called by', incoming, 'source'), edgeList('Calls', outgoing, 'target')]);
          if (n.kind === 'workload') {
            figures.append(h('p', { class: 'links' },
              h('a', { href: `#/metrics?kind=workload&name=${enc(n.name)}&namespace=${enc(n.namespace)}&direction=inbound` }, 'Metrics'),
              ' · ',
              h('a', { href: `#/traces?service=${enc(n.name + '.' + n.namespace)}` }, 'Traces')));
          }
        }
      }
      // The edge's slowest traces live in their own box, kept across refreshes.
      if (sel && sel.type === 'edge' && state.edges.has(sel.id)) {
        if (!state.tracesBox) {
          state.tracesBox = h('div', { class: 'edge-traces', 'data-testid': 'edge-traces', 'data-state': 'loading', 'data-edge-id': sel.id });
          loadEdgeTraces(state.edges.get(sel.id), state.tracesBox);
        } else if (state.tracesBox.dataset.state !== 'loading' && state.tracesBox.dataset.count === '0') {
          // None yet: look again on each refresh until some show up.
          loadEdgeTraces(state.edges.get(sel.id), state.tracesBox);
        }
        fill(details, figures, h('h4', {}, 'Slowest traces ',
          h('button', { type: 'button', class: 'small-button', title: 'Search again', 'data-testid': 'edge-traces-refresh', onclick: () => loadEdgeTraces(state.edges.get(sel.id), state.tracesBox) }, '↻')),
        state.tracesBox);
      } else {
        fill(details, figures);
      }
    }

    /** The traces that went through an edge's target, slowest first. */
    async function loadEdgeTraces(edge, box) {
      const target = state.nodes.get(edge.target);
      const service = [target.name, target.namespace].filter(Boolean).join('.');
      box.dataset.state = 'loading';
      if (!box.firstChild) box.append(h('p', { class: 'muted' }, 'Loading…'));
      let result;
      try {
        result = await api(apiUrl('/api/traces', { service, sort: 'duration', limit: 10 }));
      } catch (e) {
        box.dataset.state = 'error';
        fill(box, h('p', { class: 'err' }, 'Could not load traces: ' + e.message));
        return;
      }
      if (!ctx.alive || state.tracesBox !== box) return;
      const traces = result.traces || [];
      const maxMs = Math.max(1, ...traces.map((t) => t.duration_ms));
      fill(box,
        h('p', { class: 'muted small' }, `Traces through ${service}, longest first.`),
        traces.length === 0 ? h('p', { class: 'muted' }, 'No traces yet.') : null,
        traces.map((t) => h('div', {
          class: 'mini-trace' + (t.error_count > 0 ? ' has-errors' : ''),
          'data-testid': 'edge-trace',
          'data-trace-id': t.trace_id,
          'data-duration-ms': t.duration_ms,
          role: 'link',
          tabindex: '0',
          title: `Open trace ${t.trace_id}`,
          onclick: () => go('#/traces/' + t.trace_id),
          onkeydown: (ev) => { if (ev.key === 'Enter') go('#/traces/' + t.trace_id); },
        },
        h('span', { class: 'mini-name' }, t.root_name || t.trace_id.slice(0, 12)),
        h('span', { class: 'mini-bar' }, h('i', { style: { width: `${(t.duration_ms / maxMs) * 100}%` } })),
        h('span', { class: 'num' }, fmt.ms(t.duration_ms)),
        h('span', { class: 'num muted' }, `${t.span_count} spans`))));
      box.dataset.count = String(traces.length);
      box.dataset.state = 'loaded';
    }

    // --- polling ---
    const poller = poll(ctx, async () => {
      const data = await api(apiUrl('/api/graph', { window: graphPrefs.window }));
      if (!ctx.alive) return;
      applyGraph(data);
      renderHidden();
      renderDetails();
      const nodes = state.nodes.size;
      const edges = state.edges.size;
      empty.hidden = nodes > 0;
      empty.textContent = `No traffic in the last ${fmt.seconds(data.window_seconds || Number(graphPrefs.window))}. Send some requests through the mesh.`;
      summary.textContent = `${nodes} nodes · ${edges} edges · updated ${fmt.clock()}`;
      markReady('graph');
    });

    renderDetails();
  };

  // ---------------------------------------------------------------------------
  // Traces view: search
  // ---------------------------------------------------------------------------

  /** The search form's values, kept while switching views. */
  const traceSearch = { service: '', operation: '', status: '', min_duration_ms: '', range: '', sort: 'recent', limit: '20' };
  const RANGES = [['300', 'last 5 min'], ['900', 'last 15 min'], ['3600', 'last 1 h'], ['', 'all stored']];

  views.traces = function tracesView(root, ctx, route) {
    for (const key of Object.keys(traceSearch)) {
      if (route.params.has(key)) traceSearch[key] = route.params.get(key);
    }
    let services = [];

    const f = {
      service: select({ name: 'service', 'data-testid': 'search-service' }, [['', 'all services']]),
      operation: select({ name: 'operation', 'data-testid': 'search-operation' }, [['', 'all operations']]),
      status: select({ name: 'status', 'data-testid': 'search-status' }, [['', 'any status'], ['error', 'errors only'], ['ok', 'no errors']], traceSearch.status),
      min_duration_ms: h('input', { name: 'min_duration_ms', type: 'number', min: '0', step: 'any', placeholder: 'ms', 'data-testid': 'search-min-duration', value: traceSearch.min_duration_ms, class: 'narrow' }),
      range: select({ name: 'range', 'data-testid': 'search-range' }, RANGES, traceSearch.range),
      sort: select({ name: 'sort', 'data-testid': 'search-sort' }, [['recent', 'recent first'], ['duration', 'longest first']], traceSearch.sort),
      limit: select({ name: 'limit', 'data-testid': 'search-limit', title: 'How many traces to show' }, [['20', '20 traces'], ['50', '50 traces'], ['100', '100 traces']], traceSearch.limit),
    };
    const form = h('form', { class: 'toolbar search-form', 'data-testid': 'trace-search-form' },
      h('label', {}, 'Service ', f.service),
      h('label', {}, 'Operation ', f.operation),
      h('label', {}, 'Status ', f.status),
      h('label', { title: 'Only traces lasting at least this long' }, 'Min ', f.min_duration_ms, ' ms'),
      h('label', {}, 'Time ', f.range),
      h('label', {}, 'Sort ', f.sort),
      f.limit,
      h('button', { type: 'submit', class: 'primary', 'data-testid': 'trace-search' }, 'Search'));
    const count = h('span', { class: 'muted', 'data-testid': 'trace-count' });
    const chartBox = h('div', { class: 'scatter', 'data-testid': 'trace-scatter' });
    const results = h('div', { class: 'results', 'data-testid': 'trace-results' });
    root.append(form, h('div', { class: 'traces-body' },
      h('div', { class: 'results-head' }, h('strong', {}, 'Traces'), count,
        h('span', { class: 'muted small' }, 'Duration over time; click a dot or a row to open the trace.')),
      chartBox, results));

    let chart = null;
    ctx.onDestroy(() => chart && chart.destroy());

    function fillOperations() {
      const svc = services.find((s) => s.name === f.service.value);
      const ops = svc ? svc.operations || [] : [...new Set(services.flatMap((s) => s.operations || []))].sort();
      setOptions(f.operation, [['', 'all operations'], ...ops.map((o) => [o, o])], traceSearch.operation);
    }
    f.service.addEventListener('change', () => {
      traceSearch.operation = '';
      fillOperations();
    });

    form.addEventListener('submit', (ev) => {
      ev.preventDefault();
      search();
    });

    async function loadServices() {
      try {
        const res = await api('/api/services');
        services = (res.services || []).slice().sort((a, b) => a.name.localeCompare(b.name));
      } catch (e) {
        services = [];
      }
      if (!ctx.alive) return;
      const names = services.map((s) => [s.name, s.name]);
      // Keep a service asked for in the URL even if it has no traces yet.
      if (traceSearch.service && !services.some((s) => s.name === traceSearch.service)) names.push([traceSearch.service, traceSearch.service]);
      setOptions(f.service, [['', 'all services'], ...names], traceSearch.service);
      fillOperations();
    }

    async function search() {
      for (const key of Object.keys(f)) traceSearch[key] = f[key].value;
      const startUs = traceSearch.range ? (Date.now() - Number(traceSearch.range) * 1000) * 1000 : '';
      const url = apiUrl('/api/traces', {
        service: traceSearch.service,
        operation: traceSearch.operation,
        status: traceSearch.status,
        min_duration_ms: traceSearch.min_duration_ms,
        start_us: startUs,
        limit: traceSearch.limit,
        sort: traceSearch.sort,
      });
      clearReady();
      results.dataset.state = 'loading';
      let res;
      try {
        res = await api(url);
      } catch (e) {
        results.dataset.state = 'error';
        fill(results, h('p', { class: 'empty err' }, 'Search failed: ' + e.message));
        markReady('traces');
        return;
      }
      if (!ctx.alive) return;
      renderResults(res);
      results.dataset.state = 'loaded';
      markReady('traces');
    }

    function renderResults(res) {
      const traces = res.traces || [];
      count.textContent = `${res.total_matched ?? traces.length} matched · ${traces.length} shown`;
      if (traces.length === 0) {
        fill(results, h('p', { class: 'empty', 'data-testid': 'no-traces' }, 'No traces match. Traces appear here once requests went through the mesh.'));
        renderScatter([]);
        return;
      }
      const maxMs = Math.max(1, ...traces.map((t) => t.duration_ms));
      const rows = traces.map((t) => h('tr', {
        class: 'clickable' + (t.error_count > 0 ? ' has-errors' : ''),
        'data-testid': 'trace-row',
        'data-trace-id': t.trace_id,
        'data-duration-ms': t.duration_ms,
        onclick: () => go('#/traces/' + t.trace_id),
      },
      h('td', { class: 'num', title: fmt.dateTimeUs(t.start_us) }, fmt.timeUs(t.start_us)),
      h('td', {}, h('a', { href: '#/traces/' + t.trace_id, class: 'strong' }, t.root_name || '(no root)'), ' ', h('span', { class: 'muted' }, t.root_service)),
      h('td', { class: 'dur-cell' }, h('span', { class: 'mini-bar' }, h('i', { style: { width: `${(t.duration_ms / maxMs) * 100}%` } })), h('span', { class: 'num' }, fmt.ms(t.duration_ms))),
      h('td', { class: 'num' }, t.span_count),
      h('td', { class: 'num' }, t.error_count > 0 ? badge(String(t.error_count), 'err') : h('span', { class: 'muted' }, '0')),
      h('td', { class: 'services', title: (t.services || []).join('\n') }, h('div', { class: 'chips' }, (t.services || []).map((s) => h('span', { class: 'chip', style: { borderLeftColor: serviceColor(s) } }, s)))),
      h('td', { class: 'mono muted small' }, t.trace_id.slice(0, 12))));
      fill(results, h('table', { class: 'grid' },
        h('thead', {}, h('tr', {}, ['Start', 'Root', 'Duration', 'Spans', 'Errors', 'Services', 'Trace id'].map((c) => h('th', {}, c)))),
        h('tbody', {}, rows)));
      renderScatter(traces);
    }

    /** Duration over time of the results: a dot per trace, errors in red. */
    function renderScatter(traces) {
      const sorted = traces.slice().sort((a, b) => a.start_us - b.start_us);
      const xs = sorted.map((t) => t.start_us / 1e6);
      const ok = sorted.map((t) => (t.error_count > 0 ? null : t.duration_ms));
      const bad = sorted.map((t) => (t.error_count > 0 ? t.duration_ms : null));
      const data = [xs, ok, bad];
      const width = Math.max(300, chartBox.clientWidth);
      if (!chart) {
        const dots = (color) => ({ stroke: color, fill: color, paths: () => null, points: { show: true, size: 7, width: 1, fill: color, stroke: color } });
        chart = new uPlot({
          width,
          height: 130,
          legend: { show: false },
          cursor: { drag: { x: false, y: false }, points: { size: 11 } },
          scales: { x: { time: true }, y: { range: (u, min, max) => [0, Math.max(1, max) * 1.1] } },
          axes: [
            { size: 28, font: `11px ${FONT}` },
            { size: axisSize, font: `11px ${FONT}`, values: (u, vals) => vals.map((v) => axisValue.ms(v)) },
          ],
          series: [{}, Object.assign({ label: 'ok' }, dots(COLOR.accent)), Object.assign({ label: 'error' }, dots(COLOR.err))],
        }, data, chartBox);
        chart.over.addEventListener('click', () => {
          const i = chart.cursor.idx;
          if (i !== null && i !== undefined && chart._traces && chart._traces[i]) go('#/traces/' + chart._traces[i].trace_id);
        });
        chart.over.style.cursor = 'pointer';
      } else {
        chart.setSize({ width, height: 130 });
        chart.setData(data);
      }
      chart._traces = sorted;
    }

    const onResize = () => chart && chart.setSize({ width: Math.max(300, chartBox.clientWidth), height: 130 });
    window.addEventListener('resize', onResize);
    ctx.onDestroy(() => window.removeEventListener('resize', onResize));

    // Load the dropdowns, then show the traces matching the (kept) search.
    loadServices().then(() => ctx.alive && search());

    return {
      // The same view with other parameters in the URL (e.g. a link to a service's traces).
      update(r) {
        for (const key of Object.keys(traceSearch)) if (r.params.has(key)) traceSearch[key] = r.params.get(key);
        for (const key of Object.keys(f)) if (r.params.has(key)) f[key].value = traceSearch[key];
        loadServices().then(() => ctx.alive && search());
      },
    };
  };

  // ---------------------------------------------------------------------------
  // Trace view: one trace as a waterfall, its spans and their access-log lines
  // ---------------------------------------------------------------------------

  /**
   * Orders spans as a tree (children under their parent, by start time) and works
   * out each span's depth and self time (its duration minus the time covered by its
   * children), which tells where the time went.
   */
  function buildSpanTree(spans) {
    const byId = new Map(spans.map((s) => [s.span_id, s]));
    const children = new Map();
    const roots = [];
    for (const s of spans) {
      if (s.parent_span_id && byId.has(s.parent_span_id) && s.parent_span_id !== s.span_id) {
        if (!children.has(s.parent_span_id)) children.set(s.parent_span_id, []);
        children.get(s.parent_span_id).push(s);
      } else {
        roots.push(s);
      }
    }
    const byStart = (a, b) => a.start_us - b.start_us || a.span_id.localeCompare(b.span_id);
    roots.sort(byStart);
    const ordered = [];
    const seen = new Set();
    const walk = (s, depth) => {
      if (seen.has(s.span_id)) return; // a cycle in bad data
      seen.add(s.span_id);
      const kids = (children.get(s.span_id) || []).sort(byStart);
      ordered.push({ span: s, depth, childCount: kids.length, selfUs: selfTime(s, kids) });
      for (const k of kids) walk(k, depth + 1);
    };
    roots.forEach((r) => walk(r, 0));
    // Spans only reachable through a cycle: list them at the end.
    for (const s of spans) if (!seen.has(s.span_id)) walk(s, 0);
    return ordered;
  }

  function selfTime(span, kids) {
    const start = span.start_us;
    const end = span.start_us + span.duration_us;
    const intervals = kids
      .map((k) => [Math.max(start, k.start_us), Math.min(end, k.start_us + k.duration_us)])
      .filter(([a, b]) => b > a)
      .sort((a, b) => a[0] - b[0]);
    let covered = 0;
    let curStart = null;
    let curEnd = null;
    for (const [a, b] of intervals) {
      if (curEnd === null || a > curEnd) {
        if (curEnd !== null) covered += curEnd - curStart;
        curStart = a;
        curEnd = b;
      } else {
        curEnd = Math.max(curEnd, b);
      }
    }
    if (curEnd !== null) covered += curEnd - curStart;
    return Math.max(0, span.duration_us - covered);
  }

  /** One access-log line: the main fields on one line, the whole JSON behind a toggle. */
  function logLine(line, traceId) {
    const f = line.fields || {};
    const code = f.response_code;
    const codeClass = !code ? 'muted' : code >= 500 ? 'err' : code >= 400 ? 'warn' : 'ok';
    const flags = f.response_flags && f.response_flags !== '-' ? f.response_flags : '';
    const spanId = line.span_id || f.span_id || '';
    const json = h('pre', { class: 'log-json', hidden: true, 'data-testid': 'log-json' }, JSON.stringify(line.fields, null, 2));
    const who = [f.source_workload, f.destination_workload].some(Boolean) ? `${f.source_workload || '?'} → ${f.destination_workload || '?'}` : '';
    return h('div', {
      class: 'log-line',
      'data-testid': 'log-line',
      'data-span-id': spanId,
      'data-path': f.path ?? '',
      'data-response-code': code ?? '',
      'data-duration': f.duration ?? '',
      'data-reporter': f.reporter || '',
    },
    h('div', { class: 'log-main' },
      h('span', { class: 'num muted', title: f.start_time || fmt.dateTimeUs(line.time_us) }, fmt.timeUs(line.time_us)),
      h('span', { class: 'reporter', title: who ? `reported by the ${f.reporter} side: ${who}` : '' }, f.reporter || DASH),
      h('span', { class: 'method' }, f.method || (f.protocol === 'tcp' ? 'TCP' : DASH)),
      h('span', { class: 'path', title: `${f.authority || ''}${f.path || ''}` }, f.path || f.authority || ''),
      who ? h('span', { class: 'who muted small' }, who) : null,
      h('span', { class: `code ${codeClass}` }, code ?? DASH),
      h('span', { class: 'num' }, f.duration === undefined || f.duration === null ? DASH : fmt.ms(Number(f.duration))),
      flags ? h('span', { class: 'flags', title: 'response flags' }, flags) : null,
      h('span', { class: 'upstream mono', title: 'upstream host' }, f.upstream_host || ''),
      h('span', { class: 'spacer' }),
      spanId ? h('a', { href: `#/traces/${traceId}?span=${spanId}`, 'data-testid': 'log-to-span', title: `Show span ${spanId}` }, 'span') : null,
      h('button', {
        type: 'button', class: 'small-button', title: 'The whole access-log line', 'data-testid': 'log-expand',
        onclick: (ev) => {
          json.hidden = !json.hidden;
          ev.currentTarget.textContent = json.hidden ? '{…}' : '{ }';
        },
      }, '{…}')),
    json);
  }

  views.trace = function traceView(root, ctx, route) {
    const traceId = route.traceId;
    const state = { spans: [], ordered: [], selected: null, wantSpan: route.params.get('span') || '' };

    const header = h('div', { class: 'trace-header', 'data-testid': 'trace-header', 'data-trace-id': traceId },
      h('a', { href: '#/traces', class: 'back' }, '← Traces'), h('span', { class: 'muted' }, 'loading trace ' + traceId + '…'));
    const waterfall = h('div', { class: 'waterfall', 'data-testid': 'waterfall' });
    const traceLogs = h('div', { class: 'logs', 'data-testid': 'trace-logs', 'data-state': 'loading' });
    const traceLogsTitle = h('h4', {}, 'All log lines of this trace');
    const spanPanel = h('aside', { class: 'panel span-details', 'data-testid': 'span-details', 'data-span-id': '' },
      h('p', { class: 'muted' }, 'Click a span to see its attributes and its access-log lines.'));
    root.append(header,
      h('div', { class: 'trace-layout' },
        h('div', { class: 'trace-left' }, waterfall, h('div', { class: 'trace-logs-box' }, traceLogsTitle, traceLogs)),
        spanPanel));

    async function load() {
      clearReady();
      let trace;
      try {
        trace = await api(`/api/traces/${enc(traceId)}`, { allow404: true });
      } catch (e) {
        fill(header, h('a', { href: '#/traces', class: 'back' }, '← Traces'), h('span', { class: 'err' }, 'Could not load the trace: ' + e.message));
        markReady('trace');
        return;
      }
      if (!ctx.alive) return;
      if (!trace) {
        fill(header, h('a', { href: '#/traces', class: 'back' }, '← Traces'),
          h('span', { class: 'err', 'data-testid': 'not-found' }, `Trace ${traceId} is not stored (unknown, or evicted to make room).`));
        fill(waterfall, h('p', { class: 'empty' }, 'No spans to show. Traces are kept in memory; older ones make room for new ones.'));
        traceLogs.replaceChildren();
        traceLogs.dataset.state = 'loaded';
        markReady('trace');
        return;
      }
      state.spans = trace.spans || [];
      renderWaterfall();
      const logsDone = loadTraceLogs();
      const want = state.wantSpan || (state.selected && state.selected.span_id);
      if (want) selectSpan(want, { scroll: true, fromUrl: true });
      await logsDone;
      if (ctx.alive) markReady('trace');
      if (!recentTimer) watchRecent();
    }

    /**
     * A trace that ended moments ago may still be missing spans (proxies and apps export
     * them in batches): while it is recent, look again every 2 s, and redraw only when spans
     * were added, keeping the selection.
     */
    let recentTimer = null;
    const openedAt = Date.now();
    ctx.onDestroy(() => clearTimeout(recentTimer));
    function watchRecent() {
      const endUs = Math.max(0, ...state.spans.map((x) => x.start_us + x.duration_us));
      const recent = Date.now() * 1000 - endUs < 30e6 && Date.now() - openedAt < 30000;
      if (!recent || !ctx.alive) return;
      recentTimer = setTimeout(async () => {
        let trace = null;
        try {
          trace = await api(`/api/traces/${enc(traceId)}`, { allow404: true });
        } catch (e) {
          // Shown in the error strip; try again on the next round.
        }
        if (!ctx.alive) return;
        if (trace && (trace.spans || []).length !== state.spans.length) {
          state.spans = trace.spans || [];
          const selectedId = state.selected && state.selected.span_id;
          renderWaterfall();
          if (selectedId || state.wantSpan) {
            const row = waterfall.querySelector(`.span-row[data-span-id="${CSS.escape(selectedId || state.wantSpan)}"]`);
            if (row && selectedId) row.classList.add('selected');
            else if (row) selectSpan(state.wantSpan, { scroll: true, fromUrl: true });
          }
          await loadTraceLogs();
          if (ctx.alive) markReady('trace');
        }
        watchRecent();
      }, POLL_MS);
    }

    function renderWaterfall() {
      const spans = state.spans;
      state.ordered = buildSpanTree(spans);
      if (spans.length === 0) {
        fill(header, h('a', { href: '#/traces', class: 'back' }, '← Traces'), h('span', { class: 'muted' }, 'This trace has no spans.'));
        waterfall.replaceChildren();
        return;
      }
      const t0 = Math.min(...spans.map((s) => s.start_us));
      const t1 = Math.max(...spans.map((s) => s.start_us + s.duration_us));
      const total = Math.max(1, t1 - t0);
      const errors = spans.filter((s) => s.error).length;
      const services = new Set(spans.map((s) => s.service));
      const root0 = state.ordered[0].span;
      // The span with the most self time is where the trace spent its time.
      const slowest = state.ordered.reduce((a, b) => (b.selfUs > a.selfUs ? b : a));

      fill(header,
        h('a', { href: '#/traces', class: 'back' }, '← Traces'),
        h('strong', {}, root0.name), h('span', { class: 'muted' }, root0.service),
        h('span', { class: 'figure', 'data-testid': 'trace-duration', 'data-duration-ms': total / 1000 }, fmt.us(total)),
        h('span', {}, `${spans.length} spans`),
        h('span', {}, `${services.size} services`),
        errors ? badge(`${errors} errors`, 'err') : h('span', { class: 'muted' }, 'no errors'),
        h('span', { class: 'muted' }, fmt.dateTimeUs(t0)),
        h('span', { class: 'spacer' }),
        h('span', { class: 'mono muted small', title: 'trace id' }, traceId),
        h('button', { type: 'button', title: 'Load the trace again (spans may still be arriving)', onclick: () => load() }, 'Reload'));
      header.dataset.durationMs = String(total / 1000);

      // The time axis: five ticks across the trace.
      const ticks = [0, 0.25, 0.5, 0.75, 1].map((f) => h('span', { class: 'tick', style: { left: `${f * 100}%` } }, f === 0 ? '0' : fmt.us(total * f)));
      const axis = h('div', { class: 'span-row axis' }, h('div', { class: 'span-label muted' }, 'Service · span'), h('div', { class: 'span-dur muted' }, 'Duration'), h('div', { class: 'span-timeline' }, ticks));

      const rows = state.ordered.map(({ span: s, depth, selfUs }) => {
        const left = ((s.start_us - t0) / total) * 100;
        const width = Math.max(0.15, (s.duration_us / total) * 100);
        const color = s.error ? COLOR.err : serviceColor(s.service);
        return h('div', {
          class: 'span-row' + (s.error ? ' error' : ''),
          'data-testid': 'span-row',
          'data-span-id': s.span_id,
          'data-parent-span-id': s.parent_span_id || '',
          'data-duration-us': s.duration_us,
          'data-self-us': selfUs,
          'data-name': s.name,
          'data-service': s.service,
          'data-kind': s.kind,
          'data-error': String(!!s.error),
          tabindex: '0',
          onclick: () => selectSpan(s.span_id, { updateUrl: true }),
          onkeydown: (ev) => { if (ev.key === 'Enter') selectSpan(s.span_id, { updateUrl: true }); },
        },
        h('div', { class: 'span-label', style: { paddingLeft: `${6 + depth * 14}px` }, title: `${s.service} · ${s.name} (${s.kind})` },
          h('i', { class: 'svc-dot', style: { background: serviceColor(s.service) } }),
          h('span', { class: 'span-text' }, h('span', { class: 'svc' }, s.service), ' ', h('span', { class: 'name' }, s.name)),
          h('span', { class: 'kind' }, s.kind),
          slowest.span === s && state.ordered.length > 1 ? h('span', { class: 'hot', title: 'Most self time in this trace' }, 'slowest') : null),
        h('div', { class: 'span-dur num' }, fmt.us(s.duration_us)),
        h('div', { class: 'span-timeline' },
          h('div', { class: 'span-bar', style: { left: `${left}%`, width: `${width}%`, background: color } })));
      });
      fill(waterfall, axis, ...rows);
    }

    async function loadTraceLogs() {
      traceLogs.dataset.state = 'loading';
      let res;
      try {
        res = await api(apiUrl('/api/logs', { trace_id: traceId, limit: 500 }));
      } catch (e) {
        traceLogs.dataset.state = 'error';
        fill(traceLogs, h('p', { class: 'err' }, 'Could not load the log lines: ' + e.message));
        return;
      }
      if (!ctx.alive) return;
      const lines = (res.lines || []).slice().sort((a, b) => a.time_us - b.time_us);
      traceLogsTitle.textContent = `All log lines of this trace (${lines.length})`;
      fill(traceLogs, ...(lines.length ? lines.map((l) => logLine(l, traceId)) : [h('p', { class: 'muted' }, 'No access-log lines for this trace.')]));
      traceLogs.dataset.count = String(lines.length);
      traceLogs.dataset.state = 'loaded';
    }

    /** Selects a span: highlights its row and fills the span panel. */
    function selectSpan(spanId, { scroll = false, updateUrl = false, fromUrl = false } = {}) {
      const entry = state.ordered.find((o) => o.span.span_id === spanId);
      waterfall.querySelectorAll('.span-row.selected').forEach((r) => r.classList.remove('selected'));
      if (!entry) {
        if (fromUrl) fill(spanPanel, h('p', { class: 'warn' }, `Span ${spanId} is not in this trace (yet).`));
        return;
      }
      const s = entry.span;
      state.selected = s;
      state.wantSpan = '';
      const row = waterfall.querySelector(`.span-row[data-span-id="${CSS.escape(spanId)}"]`);
      if (row) {
        row.classList.add('selected');
        if (scroll) row.scrollIntoView({ block: 'center' });
      }
      if (updateUrl) history.replaceState(null, '', `#/traces/${traceId}?span=${spanId}`);

      const t0 = Math.min(...state.spans.map((x) => x.start_us));
      const parent = state.spans.find((x) => x.span_id === s.parent_span_id);
      const attrs = Object.entries(s.attributes || {}).sort(([a], [b]) => a.localeCompare(b));
      const spanLogs = h('div', { class: 'logs', 'data-testid': 'span-logs', 'data-span-id': s.span_id, 'data-state': 'loading' }, h('p', { class: 'muted' }, 'Loading…'));
      spanPanel.dataset.spanId = s.span_id;
      fill(spanPanel,
        h('h3', { class: s.error ? 'err' : '' }, s.name),
        kvTable([
          ['Service', s.service],
          ['Kind', s.kind],
          ['Status', s.error ? h('span', { class: 'err' }, 'error') : 'ok'],
          ['Duration', fmt.us(s.duration_us)],
          ['Self time', fmt.us(entry.selfUs)],
          ['Starts at', `+${fmt.us(s.start_us - t0)} (${fmt.timeUs(s.start_us)})`],
          ['Span id', h('span', { class: 'mono' }, s.span_id)],
          ['Parent', parent
            ? h('a', { href: `#/traces/${traceId}?span=${parent.span_id}`, 'data-testid': 'span-parent' }, `${parent.name} (${parent.service})`)
            : s.parent_span_id ? h('span', { class: 'mono muted' }, s.parent_span_id + ' (not stored)') : 'none (root)'],
        ]),
        h('h4', {}, `Attributes (${attrs.length})`),
        attrs.length
          ? kvTable(attrs.map(([k, v]) => [k, h('span', { class: 'mono' }, typeof v === 'object' ? JSON.stringify(v) : String(v))]), { class: 'kv attrs', 'data-testid': 'span-attributes' })
          : h('p', { class: 'muted' }, 'No attributes.'),
        h('h4', {}, 'Access-log lines of this span'),
        spanLogs);
      loadSpanLogs(s, spanLogs);
    }

    async function loadSpanLogs(s, box) {
      let res;
      try {
        res = await api(apiUrl('/api/logs', { trace_id: traceId, span_id: s.span_id }));
      } catch (e) {
        box.dataset.state = 'error';
        fill(box, h('p', { class: 'err' }, 'Could not load the log lines: ' + e.message));
        return;
      }
      if (!ctx.alive || state.selected !== s) return;
      let lines = res.lines || [];
      // An application's own span (data_transformation) has no access-log line of its own:
      // show the line of the request that carried it, its nearest ancestor with one.
      let carrier = null;
      if (!lines.length && (s.kind === 'internal' || s.kind === 'unspecified')) {
        for (let p = state.spans.find((x) => x.span_id === s.parent_span_id); p; p = state.spans.find((x) => x.span_id === p.parent_span_id)) {
          let up;
          try {
            up = await api(apiUrl('/api/logs', { trace_id: traceId, span_id: p.span_id }));
          } catch (e) {
            break;
          }
          if (!ctx.alive || state.selected !== s) return;
          if ((up.lines || []).length) {
            lines = up.lines;
            carrier = p;
            break;
          }
        }
      }
      fill(box, ...(lines.length
        ? [carrier && h('p', { class: 'muted small', 'data-testid': 'carrier-note' },
          'This span comes from the application; the access-log line is that of the request that carried it: ',
          h('a', { href: `#/traces/${traceId}?span=${carrier.span_id}` }, `${carrier.name} (${carrier.service})`), '.'),
          ...lines.map((l) => logLine(l, traceId))].filter(Boolean)
        : [h('p', { class: 'muted', 'data-testid': 'no-span-logs' },
          s.kind === 'internal' || s.kind === 'unspecified'
            ? 'No access-log lines: this span comes from the application, and no request around it was logged.'
            : 'No access-log lines for this span.')]));
      box.dataset.count = String(lines.length);
      box.dataset.from = carrier ? carrier.span_id : s.span_id;
      box.dataset.state = 'loaded';
      if (document.body.dataset.ready === 'trace') markReady('trace');
    }

    load();

    return {
      // Another ?span= of the same trace (e.g. a log line's "span" link).
      update(r) {
        const want = r.params.get('span');
        if (!want) return;
        if (state.ordered.length) selectSpan(want, { scroll: true, fromUrl: true });
        else state.wantSpan = want;
      },
    };
  };

  // ---------------------------------------------------------------------------
  // Metrics view
  // ---------------------------------------------------------------------------

  const metricsPrefs = { kind: 'service', name: '', namespace: '', direction: 'inbound', window: '300' };

  /** Settings of the four charts: title, test id, series and how to show values. */
  const CHARTS = [
    { id: 'chart-rps', title: 'Requests per second', series: [['rps', 'rps', COLOR.accent]], value: (v) => fmt.rps(v), axis: (v) => axisValue.plain(v) },
    { id: 'chart-errors', title: 'Error rate', series: [['error_rate', 'errors', COLOR.err]], scale: 100, value: (v) => (v === null ? DASH : v.toFixed(v < 10 ? 2 : 0) + '%'), axis: (v) => axisValue.plain(v) + '%' },
    { id: 'chart-duration', title: 'Duration', series: [['p50_ms', 'p50', '#1a8f4c'], ['p90_ms', 'p90', '#d07b00'], ['p99_ms', 'p99', '#b02a8f']], value: (v) => fmt.ms(v), axis: (v) => axisValue.ms(v) },
    { id: 'chart-sizes', title: 'Average size', series: [['request_bytes_avg', 'request', '#2563c9'], ['response_bytes_avg', 'response', '#7a4fd0']], value: (v) => fmt.bytes(v), axis: (v) => fmt.bytes(v) },
  ];
  /** What the fourth chart shows for a target that carries TCP only (Redis, PostgreSQL). */
  const TCP_CHART = { id: 'chart-sizes', title: 'TCP bytes per second', series: [['tcp_received_bps', 'received', '#2563c9'], ['tcp_sent_bps', 'sent', '#7a4fd0']], value: (v) => (v === null ? DASH : fmt.bytes(v) + '/s'), axis: (v) => fmt.bytes(v) + '/s' };

  views.metrics = function metricsView(root, ctx, route) {
    applyMetricsParams(route.params);
    let targets = { services: [], workloads: [] };
    let targetsKey = '';

    const kindSelect = select({ 'data-testid': 'metrics-kind' }, [['service', 'Service'], ['workload', 'Workload']], metricsPrefs.kind);
    const targetSelect = select({ 'data-testid': 'metrics-target', class: 'wide' }, []);
    const directionSelect = select({ 'data-testid': 'metrics-direction' }, [['inbound', 'inbound'], ['outbound', 'outbound']], metricsPrefs.direction);
    directionSelect.disabled = metricsPrefs.kind === 'service';
    const windowSelect = select({ 'data-testid': 'metrics-window' }, [['300', 'last 5 min'], ['900', 'last 15 min'], ['3600', 'last 1 h']], metricsPrefs.window);
    const updated = h('span', { class: 'muted' });
    const headline = h('div', { class: 'headline', 'data-testid': 'headline' });
    const cards = CHARTS.map((c) => {
      const plot = h('div', { class: 'plot', 'data-testid': c.id, 'data-points': '0' });
      const noData = h('div', { class: 'no-data', hidden: true }, 'No data in this window');
      const card = h('section', { class: 'card chart-card' }, h('h4', {}, c.title), h('div', { class: 'plot-wrap' }, plot, noData));
      return { def: c, card, plot, noData, chart: null, title: card.querySelector('h4') };
    });
    root.append(
      h('div', { class: 'toolbar' },
        h('label', {}, 'Kind ', kindSelect),
        h('label', {}, 'Target ', targetSelect),
        h('label', {}, 'Direction ', directionSelect),
        h('label', {}, 'Window ', windowSelect),
        h('span', { class: 'spacer' }), updated),
      headline,
      h('div', { class: 'chart-grid' }, cards.map((c) => c.card)));
    ctx.onDestroy(() => cards.forEach((c) => c.chart && c.chart.destroy()));

    function applyMetricsParams(params) {
      for (const key of Object.keys(metricsPrefs)) if (params.has(key)) metricsPrefs[key] = params.get(key);
    }

    function targetValue(kind, t) {
      return kind === 'service' ? t.name : `${t.namespace}/${t.name}`;
    }

    /** Fills the target dropdown for the chosen kind, keeping the current target. */
    function fillTargets() {
      const kind = kindSelect.value;
      const list = kind === 'service' ? targets.services || [] : targets.workloads || [];
      const options = list.map((t) => [targetValue(kind, t), kind === 'service' ? t.name : `${t.name}.${t.namespace}`]);
      const want = kind === 'service' ? metricsPrefs.name : `${metricsPrefs.namespace}/${metricsPrefs.name}`;
      if (metricsPrefs.name && metricsPrefs.kind === kind && !options.some(([v]) => v === want)) options.unshift([want, want + ' (no data)']);
      setOptions(targetSelect, options.length ? options : [['', 'no targets yet']], want);
      directionSelect.disabled = kind === 'service';
      if (kind === 'service') directionSelect.value = 'inbound';
      readSelectors();
    }

    function readSelectors() {
      metricsPrefs.kind = kindSelect.value;
      metricsPrefs.direction = kindSelect.value === 'service' ? 'inbound' : directionSelect.value;
      metricsPrefs.window = windowSelect.value;
      const v = targetSelect.value;
      if (metricsPrefs.kind === 'service') {
        metricsPrefs.name = v;
        metricsPrefs.namespace = '';
      } else {
        const slash = v.indexOf('/');
        metricsPrefs.namespace = slash >= 0 ? v.slice(0, slash) : '';
        metricsPrefs.name = slash >= 0 ? v.slice(slash + 1) : v;
      }
    }

    kindSelect.addEventListener('change', () => {
      metricsPrefs.kind = kindSelect.value;
      metricsPrefs.name = '';
      fillTargets();
      poller.now();
    });
    for (const el of [targetSelect, directionSelect, windowSelect]) {
      el.addEventListener('change', () => {
        readSelectors();
        poller.now();
      });
    }

    async function loadTargets() {
      const res = await api('/api/metrics/targets');
      const key = JSON.stringify(res);
      if (key === targetsKey) return;
      targetsKey = key;
      targets = res;
      fillTargets();
    }

    function latest(values) {
      for (let i = (values || []).length - 1; i >= 0; i--) if (values[i] !== null && values[i] !== undefined) return values[i];
      return null;
    }

    function renderHeadline(m) {
      const figure = (label, value, testid, cls) => h('div', { class: 'figure-box', 'data-testid': testid }, h('span', { class: 'muted small' }, label), h('strong', { class: cls || '' }, value));
      const err = latest(m.error_rate);
      fill(headline,
        figure('Requests/s', fmt.rps(latest(m.rps)), 'headline-rps'),
        figure('Errors', fmt.pct(err), 'headline-errors', err > 0 ? 'err' : ''),
        figure('p99', fmt.ms(latest(m.p99_ms)), 'headline-p99'),
        h('div', { class: 'muted small' }, `Latest values; one point every ${m.step_seconds || '?'} s.`,
          metricsPrefs.kind === 'service' ? ' Services have inbound metrics only.' : ''));
    }

    function renderCharts(m) {
      const xs = m.timestamps || [];
      // A target with TCP traffic and no requests: the fourth chart shows its bytes instead.
      const some = (k) => (m[k] || []).some((v) => v > 0);
      const tcpOnly = !some('rps') && (some('tcp_sent_bps') || some('tcp_received_bps'));
      const fourth = cards[cards.length - 1];
      const want = tcpOnly ? TCP_CHART : CHARTS[CHARTS.length - 1];
      if (fourth.def !== want) {
        fourth.def = want;
        fourth.title.textContent = want.title;
        if (fourth.chart) fourth.chart.destroy();
        fourth.chart = null;
        fill(fourth.plot);
      }
      for (const c of cards) {
        const ys = c.def.series.map(([key]) => (m[key] || []).map((v) => (v === null || v === undefined ? null : c.def.scale ? v * c.def.scale : v)));
        const data = [xs, ...ys];
        const points = ys[0].filter((v) => v !== null).length;
        c.plot.dataset.points = String(points);
        c.noData.hidden = ys.some((s) => s.some((v) => v !== null));
        const width = Math.max(200, c.plot.parentElement.clientWidth);
        const height = Math.max(120, c.plot.parentElement.clientHeight - 30);
        if (!c.chart) {
          c.chart = new uPlot({
            width,
            height,
            cursor: { drag: { x: true, y: false } },
            scales: { x: { time: true }, y: { range: (u, min, max) => [0, max > 0 ? max * 1.1 : 1] } },
            axes: [
              { size: 28, font: `11px ${FONT}` },
              { size: axisSize, font: `11px ${FONT}`, values: (u, vals) => vals.map((v) => c.def.axis(v)) },
            ],
            series: [
              { value: (u, v) => (v === null ? DASH : new Date(v * 1000).toLocaleTimeString()) },
              ...c.def.series.map(([, label, color]) => ({
                label, stroke: color, width: 1.5, fill: c.def.series.length === 1 ? color + '22' : undefined, value: (u, v) => c.def.value(v), spanGaps: false,
                // Few points (a mesh just started): draw them as dots, a lone one has no line.
                points: { show: (u, si) => u.data[si].filter((v) => v !== null && v !== undefined).length < 30, size: 5 },
              })),
            ],
          }, data, c.plot);
        } else {
          c.chart.setData(data);
        }
      }
    }

    const resize = new ResizeObserver(() => {
      for (const c of cards) {
        if (!c.chart) continue;
        const width = Math.max(200, c.plot.parentElement.clientWidth);
        const height = Math.max(120, c.plot.parentElement.clientHeight - 30);
        if (width !== c.chart.width || height !== c.chart.height) c.chart.setSize({ width, height });
      }
    });
    cards.forEach((c) => resize.observe(c.plot.parentElement));
    ctx.onDestroy(() => resize.disconnect());

    let tick = 0;
    const poller = poll(ctx, async () => {
      // Targets change rarely: look at them every fifth refresh.
      if (tick++ % 5 === 0 || !targetSelect.value) await loadTargets();
      if (!ctx.alive) return;
      if (!metricsPrefs.name) {
        fill(headline, h('p', { class: 'muted', 'data-testid': 'no-targets' }, 'No metrics yet: the console lists services and workloads once it has scraped their proxies.'));
        markReady('metrics');
        return;
      }
      const m = await api(apiUrl('/api/metrics', {
        kind: metricsPrefs.kind,
        name: metricsPrefs.name,
        namespace: metricsPrefs.kind === 'workload' ? metricsPrefs.namespace : '',
        direction: metricsPrefs.direction,
        window: metricsPrefs.window,
      }));
      if (!ctx.alive) return;
      renderHeadline(m);
      renderCharts(m);
      updated.textContent = 'updated ' + fmt.clock();
      markReady('metrics');
    });

    return {
      update(r) {
        applyMetricsParams(r.params);
        kindSelect.value = metricsPrefs.kind;
        directionSelect.value = metricsPrefs.direction;
        windowSelect.value = metricsPrefs.window;
        fillTargets();
        poller.now();
      },
    };
  };

  // ---------------------------------------------------------------------------
  // Config view
  // ---------------------------------------------------------------------------

  const SEVERITY_ORDER = { error: 0, warning: 1, info: 2 };
  const STATE_BADGE = { synced: 'ok', pending: 'warn', nacked: 'err', disconnected: 'muted' };

  views.config = function configView(root, ctx) {
    const banner = h('div', { class: 'banner err', 'data-testid': 'rejected', hidden: true });
    const summary = h('div', { class: 'config-summary', 'data-testid': 'config-summary' }, 'loading…');
    const findings = h('section', { class: 'card', 'data-testid': 'findings' });
    const proxies = h('section', { class: 'card', 'data-testid': 'proxies' });
    const resources = h('section', { class: 'card', 'data-testid': 'resources' });
    root.append(banner, summary, findings, proxies, resources);
    let last = '';

    function place(f) {
      if (!f.file) return DASH;
      return `${f.file}${f.line ? ':' + f.line : ''}${f.line && f.column ? ':' + f.column : ''}`;
    }

    function renderFindings(list) {
      const sorted = list.slice().sort((a, b) => (SEVERITY_ORDER[a.severity] ?? 3) - (SEVERITY_ORDER[b.severity] ?? 3) ||
        String(a.file).localeCompare(String(b.file)) || (a.line || 0) - (b.line || 0));
      fill(findings, h('h3', {}, `Findings (${list.length})`),
        sorted.length === 0
          ? h('p', { class: 'empty-inline', 'data-testid': 'no-findings' }, 'No findings: the configuration passed every check.')
          : h('table', { class: 'grid' },
            h('thead', {}, h('tr', {}, ['Severity', 'Code', 'Location', 'Message', 'Resource', 'Field'].map((c) => h('th', {}, c)))),
            h('tbody', {}, sorted.map((f) => h('tr', {
              'data-testid': 'finding',
              'data-code': f.code,
              'data-severity': f.severity,
              'data-file': f.file || '',
              'data-line': f.line ?? '',
              'data-column': f.column ?? '',
            },
            h('td', {}, badge(f.severity, f.severity === 'error' ? 'err' : f.severity === 'warning' ? 'warn' : 'info')),
            h('td', { class: 'mono' }, f.code),
            h('td', { class: 'mono small', title: f.file || '' }, place(f)),
            h('td', {}, f.message),
            h('td', {}, f.resource || DASH),
            h('td', { class: 'mono small' }, f.field || DASH))))));
    }

    const short = (hash) => (hash ? h('span', { class: 'mono', title: hash }, hash.slice(0, 8)) : h('span', { class: 'muted' }, DASH));

    function renderProxies(list) {
      const sorted = list.slice().sort((a, b) => (a.namespace + '/' + a.name).localeCompare(b.namespace + '/' + b.name) || String(a.id).localeCompare(String(b.id)));
      const counts = {};
      for (const p of list) counts[p.state] = (counts[p.state] || 0) + 1;
      fill(proxies, h('h3', {}, `Proxies (${list.length})`, ' ',
        Object.entries(counts).map(([s, n]) => badge(`${n} ${s}`, STATE_BADGE[s] || 'muted'))),
      sorted.length === 0
        ? h('p', { class: 'empty-inline', 'data-testid': 'no-proxies' }, 'No proxy has connected to the control plane.')
        : h('table', { class: 'grid' },
          h('thead', {}, h('tr', {}, ['Proxy', 'Namespace', 'Role', 'State', 'For', 'Sent', 'Acked', 'Nacked', 'NACK reason', 'NACK source'].map((c) => h('th', {}, c)))),
          h('tbody', {}, sorted.map((p) => h('tr', {
            'data-testid': 'proxy-row',
            'data-name': p.name,
            'data-namespace': p.namespace,
            'data-id': p.id,
            'data-state': p.state,
            'data-connected': String(!!p.connected),
          },
          h('td', { title: p.id }, h('strong', {}, p.name)),
          h('td', {}, p.namespace),
          h('td', {}, p.role),
          h('td', {}, badge(p.state, STATE_BADGE[p.state] || 'muted', { 'data-testid': 'proxy-state' }), p.connected ? null : h('span', { class: 'muted small' }, ' (not connected)')),
          h('td', { class: 'num' }, fmt.seconds(p.since_seconds)),
          h('td', {}, short(p.sent)),
          h('td', {}, short(p.acked)),
          h('td', {}, short(p.nacked)),
          h('td', { class: p.nack_reason ? 'err' : '' }, p.nack_reason || ''),
          h('td', { class: 'mono small' }, p.nack_source || ''))))));
    }

    function renderResources(list) {
      const byKind = new Map();
      for (const r of list) {
        if (!byKind.has(r.kind)) byKind.set(r.kind, []);
        byKind.get(r.kind).push(r);
      }
      const kinds = [...byKind.keys()].sort();
      fill(resources, h('h3', {}, `Resources (${list.length})`),
        list.length === 0 ? h('p', { class: 'empty-inline' }, 'No resources loaded.') : h('div', { class: 'resource-groups' },
          kinds.map((kind) => h('div', { class: 'resource-group', 'data-testid': 'resource-group', 'data-kind': kind },
            h('h4', {}, `${kind} (${byKind.get(kind).length})`),
            h('ul', { class: 'plain' }, byKind.get(kind)
              .sort((a, b) => (a.namespace + '/' + a.name).localeCompare(b.namespace + '/' + b.name))
              .map((r) => h('li', { 'data-testid': 'resource', 'data-kind': r.kind, 'data-name': r.name, 'data-namespace': r.namespace || '' },
                h('span', {}, r.namespace ? `${r.namespace}/` : '', h('strong', {}, r.name)), ' ',
                h('span', { class: 'mono muted small', title: r.file || '' }, place(r)))))))));
    }

    poll(ctx, async () => {
      const cfg = await api('/api/config');
      if (!ctx.alive) return;
      const text = JSON.stringify(cfg);
      if (text !== last) {
        last = text;
        banner.hidden = !cfg.rejected;
        banner.textContent = cfg.rejected ? `The last configuration change was rejected: ${cfg.rejected}. The proxies keep the previous configuration.` : '';
        const findingsList = cfg.findings || [];
        const bySeverity = {};
        for (const f of findingsList) bySeverity[f.severity] = (bySeverity[f.severity] || 0) + 1;
        fill(summary,
          h('span', { 'data-testid': 'config-generation', 'data-generation': cfg.generation }, `Generation ${cfg.generation}`),
          ` · ${(cfg.resources || []).length} resources · ${(cfg.proxies || []).length} proxies · `,
          findingsList.length ? Object.entries(bySeverity).map(([s, n]) => `${n} ${s}${n > 1 ? 's' : ''}`).join(', ') : 'no findings',
          h('span', { class: 'muted' }, ` · updated ${fmt.clock()}`));
        renderFindings(findingsList);
        renderProxies(cfg.proxies || []);
        renderResources(cfg.resources || []);
      } else {
        const stamp = summary.lastChild;
        if (stamp) stamp.textContent = ` · updated ${fmt.clock()}`;
      }
      markReady('config');
    }, CONFIG_POLL_MS);
  };

  // ---------------------------------------------------------------------------
  // Start
  // ---------------------------------------------------------------------------

  window.addEventListener('hashchange', route);
  if (!location.hash || location.hash === '#' || location.hash === '#/') history.replaceState(null, '', '#/graph');
  route();
})();
