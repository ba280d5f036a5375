#!/usr/bin/env node
// Drives a headless browser (Chromium, or Firefox over WebDriver BiDi) through the Trellis
// console for the end-to-end tests.
//
//   node driver.mjs <scenario>
//
// Environment:
//   CONSOLE_URL  the console's base URL (default http://127.0.0.1:15014)
//   SHOTS_DIR    where screenshots go (default $TMPDIR/console-shots)
//   BROWSER      chromium (default) or firefox
//   CHROMIUM     Chromium's executable (default /usr/bin/chromium)
//   FIREFOX      Firefox's executable (default /usr/bin/firefox-esr), driven over WebDriver
//                BiDi (playwright's "moz-firefox" channel: the stock browser, no patched build)
//   TIMEOUT_MS   how long a scenario's main wait may take (default per scenario)
//   and the scenario's own variables (below).
//
// Scenarios:
//   graph    EXPECT_NODES=a,b,c [CANARY_SOURCE=x CANARY_TARGET=prefix] [SHOT_NAME=graph]
//            waits until edges touching every expected node carry traffic (and, with
//            CANARY_*, until the source calls ≥2 targets whose names start with the
//            prefix), then taps the first edge into the first expected node.
//   views    searches traces, opens the first trace and its first span, shows the
//            first service's metrics, then the config.
//   slow     EDGE_SOURCE, EDGE_TARGET, SPAN_NAME: click 1 the graph edge (with the mouse,
//            where it is drawn) → click 2 its slowest trace → click 3 the span with the most
//            self time (its duration less its children's: the root always has the longest
//            plain duration), whose access-log lines then show (for an application's own
//            span, those of the request that carried it). Reports the clicks made and the
//            log lines shown; fails if SPAN_NAME is set and is not that span's name.
//   finding  EXPECT_FILE, EXPECT_PRESENT=1|0 (and optionally EDIT_FILE, EDIT_FROM: the page
//            open, EDIT_FROM's content replaces EDIT_FILE, and the clock starts): waits until a finding in a file ending
//            with EXPECT_FILE is (1) or is not (0) listed.
//   proxy    PROXY_NAME, EXPECT_STATE: waits until that proxy shows that state.
//
// On success it prints one JSON line with the scenario's results and exits 0. On
// failure it prints {"error": ...} as one JSON line, a readable account on stderr
// (with the page's last failed API calls and console errors), and exits 1.
//
// Waits are only on what the page exposes: body[data-ready], elements appearing,
// and bounded waitForFunction polls. Never a fixed sleep.

import { chromium, firefox } from 'playwright-core';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

const scenario = process.argv[2] || '';
const BASE = (process.env.CONSOLE_URL || 'http://127.0.0.1:15014').replace(/\/+$/, '');
const SHOTS = process.env.SHOTS_DIR || path.join(os.tmpdir(), 'console-shots');
const BROWSER = process.env.BROWSER || 'chromium';
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const FIREFOX = process.env.FIREFOX || '/usr/bin/firefox-esr';
const DEFAULT_TIMEOUT = { graph: 60000, views: 30000, slow: 60000, finding: 10000, proxy: 30000 };
/** The variables each scenario cannot do without (checked before the browser starts). */
const REQUIRED_ENV = { graph: ['EXPECT_NODES'], views: [], slow: ['EDGE_SOURCE', 'EDGE_TARGET'], finding: ['EXPECT_FILE', 'EXPECT_PRESENT'], proxy: ['PROXY_NAME', 'EXPECT_STATE'] };
const TIMEOUT = Number(process.env.TIMEOUT_MS || DEFAULT_TIMEOUT[scenario] || 30000);
/** Waits for things that follow from a click (a view rendering) rather than from the mesh. */
const STEP_TIMEOUT = Math.max(10000, Math.min(TIMEOUT, 30000));

/** A failed expectation, with what the page showed at the time. */
class Failure extends Error {
  constructor(message, details) {
    super(message);
    this.details = details;
  }
}

function env(name) {
  const value = process.env[name];
  if (value === undefined || value === '') throw new Failure(`${name} is not set`);
  return value;
}

function list(value) {
  return String(value || '').split(',').map((s) => s.trim()).filter(Boolean);
}

const num = (v) => (v === '' || v === undefined || v === null ? null : Number(v));

// ---------------------------------------------------------------------------
// Helpers working on the page
// ---------------------------------------------------------------------------

async function open(page, hash) {
  await page.goto(`${BASE}/${hash}`, { waitUntil: 'domcontentloaded' });
}

/**
 * Polls `fn` in the page (every 250 ms) until it returns a truthy value, which is
 * returned. On timeout, fails with `what` and the page's state.
 */
async function waitFor(page, what, fn, arg, timeout = TIMEOUT) {
  try {
    const handle = await page.waitForFunction(fn, arg, { polling: 250, timeout });
    return await handle.jsonValue();
  } catch (e) {
    if (e.name === 'TimeoutError' || /Timeout/.test(e.message)) {
      throw new Failure(`timed out after ${timeout} ms waiting for ${what}`, await pageState(page));
    }
    throw e;
  }
}

/** Waits until a view says it has rendered (body[data-ready=view]). */
async function ready(page, view, timeout = STEP_TIMEOUT) {
  await waitFor(page, `the ${view} view to render (body[data-ready=${view}])`, (v) => document.body.dataset.ready === v, view, timeout);
}

async function shot(page, name) {
  await page.screenshot({ path: path.join(SHOTS, name) });
}

/** A summary of what the console shows, for failure reports. */
async function pageState(page) {
  try {
    return await page.evaluate(() => {
      const all = (sel) => [...document.querySelectorAll(sel)];
      return {
        url: location.href,
        ready: document.body.dataset.ready || null,
        api_errors: (window.trellisApiErrors || []).slice(-5),
        graph_edges: all('[data-testid=graph-edge]').slice(0, 40).map((r) => `${r.dataset.sourceName} -> ${r.dataset.targetName} ${r.dataset.targetVersion} rps=${r.dataset.rps} share=${r.dataset.share} ${r.dataset.protocol}`),
        details: document.querySelector('[data-testid=details]')?.dataset.id || undefined,
        edge_traces: all('[data-testid=edge-trace]').length,
        trace_rows: all('[data-testid=trace-row]').length,
        span_rows: all('[data-testid=span-row]').map((r) => `${r.dataset.name} (${r.dataset.kind}) ${r.dataset.durationUs} us, self ${r.dataset.selfUs} us`).slice(0, 40),
        findings: all('[data-testid=finding]').map((r) => `${r.dataset.severity} ${r.dataset.code} ${r.dataset.file}:${r.dataset.line}`),
        proxies: all('[data-testid=proxy-row]').map((r) => `${r.dataset.namespace}/${r.dataset.name} ${r.dataset.state}`),
        rps_points: document.querySelector('[data-testid=chart-rps]')?.dataset.points,
      };
    }).then((state) => Object.fromEntries(Object.entries(state).filter(([, v]) => v !== undefined && !(Array.isArray(v) && v.length === 0))));
  } catch (e) {
    return { error: 'could not read the page: ' + e.message };
  }
}

/** The hidden edge table of the graph view, as data. */
function readEdges(page) {
  return page.evaluate(() => [...document.querySelectorAll('[data-testid=graph-edge]')].map((r) => ({
    id: r.dataset.id,
    source: r.dataset.sourceName,
    target: r.dataset.targetName,
    version: r.dataset.targetVersion,
    rps: r.dataset.rps === '' ? null : Number(r.dataset.rps),
    share: r.dataset.share === '' ? null : Number(r.dataset.share),
    protocol: r.dataset.protocol,
    bytes_per_second: r.dataset.bytesPerSecond === '' ? null : Number(r.dataset.bytesPerSecond),
  })));
}

/** Taps a graph element the way a click does, through cytoscape (window.trellisGraph). */
/** Clicks a graph element with the mouse, at the point where it is drawn (an edge's midpoint,
 * a node's centre), and waits for its details panel. */
async function clickGraphElement(page, id) {
  const at = await page.evaluate((id) => {
    const cy = window.trellisGraph;
    const ele = cy && cy.getElementById(id);
    if (!ele || ele.empty()) return null;
    const p = ele.isEdge() ? ele.renderedMidpoint() : ele.renderedPosition();
    const box = cy.container().getBoundingClientRect();
    return { x: box.left + p.x, y: box.top + p.y };
  }, id);
  if (!at) throw new Failure(`graph element ${id} is not in window.trellisGraph`, await pageState(page));
  await page.mouse.click(at.x, at.y);
  await waitFor(page, `the details panel of ${id}`, (id) => document.querySelector('[data-testid=details]')?.dataset.id === id, id, STEP_TIMEOUT);
}

async function tapGraphElement(page, id) {
  const found = await page.evaluate((id) => {
    const cy = window.trellisGraph;
    if (!cy) return false;
    const ele = cy.getElementById(id);
    if (ele.empty()) return false;
    ele.emit('tap');
    return true;
  }, id);
  if (!found) throw new Failure(`graph element ${id} is not in window.trellisGraph`, await pageState(page));
  await waitFor(page, `the details panel of ${id}`, (id) => document.querySelector('[data-testid=details]')?.dataset.id === id, id, STEP_TIMEOUT);
}

// ---------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------

const scenarios = {
  async graph(page) {
    const expected = list(env('EXPECT_NODES'));
    const canarySource = process.env.CANARY_SOURCE || '';
    const canaryTarget = process.env.CANARY_TARGET || '';
    await open(page, '#/graph');
    await waitFor(page, `edges with traffic touching every one of ${expected.join(', ')}`, (names) => {
      const seen = new Set();
      for (const r of document.querySelectorAll('[data-testid=graph-edge]')) {
        // Traffic: requests per second, or bytes per second on a TCP edge.
        const live = Number(r.dataset.rps) > 0 || (r.dataset.protocol === 'tcp' && Number(r.dataset.bytesPerSecond) > 0);
        if (!live) continue;
        seen.add(r.dataset.sourceName);
        seen.add(r.dataset.targetName);
      }
      return names.every((n) => seen.has(n));
    }, expected);

    let canary = [];
    if (canarySource && canaryTarget) {
      await waitFor(page, `≥2 edges with traffic from ${canarySource} to targets named ${canaryTarget}*`, ({ source, prefix }) =>
        [...document.querySelectorAll('[data-testid=graph-edge]')]
          .filter((r) => r.dataset.sourceName === source && r.dataset.targetName.startsWith(prefix) && Number(r.dataset.rps) > 0).length >= 2,
      { source: canarySource, prefix: canaryTarget });
    }
    await ready(page, 'graph');
    const edges = await readEdges(page);
    if (canarySource && canaryTarget) {
      canary = edges.filter((e) => e.source === canarySource && e.target.startsWith(canaryTarget))
        .map((e) => ({ target: e.target, version: e.version, share: e.share }))
        .sort((a, b) => (b.share ?? 0) - (a.share ?? 0));
    }
    await shot(page, `${process.env.SHOT_NAME || 'graph'}.png`);

    // The first edge into the first expected node (or out of it, when nothing calls it).
    const first = expected[0];
    const clicked = edges.find((e) => e.target === first) || edges.find((e) => e.source === first);
    if (!clicked) throw new Failure(`no edge touches ${first}`, await pageState(page));
    await tapGraphElement(page, clicked.id);
    await waitFor(page, 'the slowest traces of the edge to load', () => {
      const box = document.querySelector('[data-testid=edge-traces]');
      return box && box.dataset.state !== 'loading';
    }, undefined, STEP_TIMEOUT);
    await shot(page, `${process.env.SHOT_NAME || 'graph'}-details.png`);

    return {
      edges: edges.map(({ source, target, version, rps, share, protocol }) => ({ source, target, version, rps, share, protocol })),
      canary,
      clicked: { id: clicked.id, source: clicked.source, target: clicked.target },
    };
  },

  async views(page) {
    const out = {};
    // Traces: submit a search with the form's defaults until it finds something.
    await open(page, '#/traces');
    await ready(page, 'traces');
    await page.click('[data-testid=trace-search]');
    await waitFor(page, 'a trace search with at least one result', () => {
      if (document.querySelectorAll('[data-testid=trace-row]').length > 0) return true;
      // No traces yet: search again (at most every second) once the last search finished.
      const now = Date.now();
      if (document.body.dataset.ready === 'traces' && now - (window.__lastSearch || 0) > 1000) {
        window.__lastSearch = now;
        document.querySelector('[data-testid=trace-search]').click();
      }
      return false;
    });
    out.trace_rows = await page.locator('[data-testid=trace-row]').count();
    out.traces_matched = await page.locator('[data-testid=trace-count]').textContent();
    await shot(page, 'traces.png');

    // The first trace, and its first span.
    const firstRow = page.locator('[data-testid=trace-row]').first();
    out.trace_id = await firstRow.getAttribute('data-trace-id');
    await firstRow.click();
    await ready(page, 'trace');
    await waitFor(page, 'span rows', () => document.querySelectorAll('[data-testid=span-row]').length > 0, undefined, STEP_TIMEOUT);
    out.spans = await page.locator('[data-testid=span-row]').count();
    const firstSpan = page.locator('[data-testid=span-row]').first();
    const spanId = await firstSpan.getAttribute('data-span-id');
    await firstSpan.click();
    await waitFor(page, `the log lines of span ${spanId}`, (id) => {
      const box = document.querySelector('[data-testid=span-logs]');
      return box && box.dataset.spanId === id && box.dataset.state === 'loaded';
    }, spanId, STEP_TIMEOUT);
    out.span_attributes = await page.locator('[data-testid=span-attributes] tr').count();
    out.span_log_lines = await page.locator('[data-testid=span-logs] [data-testid=log-line]').count();
    out.trace_log_lines = await page.locator('[data-testid=trace-logs] [data-testid=log-line]').count();
    await shot(page, 'trace.png');

    // Metrics of the first service.
    await page.click('[data-testid=tab-metrics]');
    await waitFor(page, 'the metrics view', () => !!document.querySelector('[data-testid=metrics-kind]'), undefined, STEP_TIMEOUT);
    await page.selectOption('[data-testid=metrics-kind]', 'service');
    await waitFor(page, 'a service in the metrics target list', () => {
      const sel = document.querySelector('[data-testid=metrics-target]');
      return sel && sel.options.length > 0 && sel.options[0].value !== '';
    });
    const target = await page.evaluate(() => document.querySelector('[data-testid=metrics-target]').options[0].value);
    await page.selectOption('[data-testid=metrics-target]', target);
    await waitFor(page, `rps points for ${target}`, () => Number(document.querySelector('[data-testid=chart-rps]')?.dataset.points) > 0);
    await ready(page, 'metrics');
    out.metrics_target = target;
    out.rps_points = Number(await page.getAttribute('[data-testid=chart-rps]', 'data-points'));
    await shot(page, 'metrics.png');

    // Config.
    await page.click('[data-testid=tab-config]');
    await ready(page, 'config');
    out.findings = await page.locator('[data-testid=finding]').count();
    out.proxies = await page.locator('[data-testid=proxy-row]').count();
    out.resources = await page.locator('[data-testid=resource]').count();
    await shot(page, 'config.png');
    return out;
  },

  async slow(page) {
    const source = env('EDGE_SOURCE');
    const target = env('EDGE_TARGET');
    const spanName = process.env.SPAN_NAME || '';
    let clicks = 0;

    // The edge, selected in the graph.
    await open(page, '#/graph');
    const edgeId = await waitFor(page, `an edge ${source} -> ${target} with traffic`, ({ source, target }) => {
      const row = [...document.querySelectorAll('[data-testid=graph-edge]')]
        .find((r) => r.dataset.sourceName === source && r.dataset.targetName === target && Number(r.dataset.rps) > 0);
      return row ? row.dataset.id : false;
    }, { source, target });
    // Click 1: the edge itself, with the mouse, where it is drawn.
    await clickGraphElement(page, edgeId);
    clicks++;
    // The panel searches again on each refresh while the edge has no traces yet.
    await waitFor(page, `a slowest-trace row for ${source} -> ${target}`, () => document.querySelectorAll('[data-testid=edge-trace]').length > 0);
    await shot(page, 'slow-1.png');

    // Click 2: the slowest trace.
    const row = page.locator('[data-testid=edge-trace]').first();
    const traceId = await row.getAttribute('data-trace-id');
    const traceDurationMs = Number(await row.getAttribute('data-duration-ms'));
    await row.click();
    clicks++;
    await waitFor(page, `trace ${traceId} to render`, (id) => document.body.dataset.ready === 'trace' &&
      document.querySelector('[data-testid=trace-header]')?.dataset.traceId === id &&
      document.querySelectorAll('[data-testid=span-row]').length > 0, traceId, STEP_TIMEOUT);

    // Spans of a trace that just ended may still be arriving (the page reloads a recent
    // trace by itself): give the expected span a moment to show, without clicking.
    if (spanName) {
      await waitFor(page, `a span named ${spanName} in trace ${traceId}`, (name) =>
        [...document.querySelectorAll('[data-testid=span-row]')].some((r) => r.dataset.name === name), spanName, STEP_TIMEOUT)
        .catch(() => {}); // Not there: the check after click 2 reports it.
    }

    // Click 3: the span where the time went, i.e. with the most self time (its duration
    // less its children's; the root always has the largest plain duration). Its access-log
    // lines show with it (for an application's span, those of the request that carried it).
    const spans = await page.evaluate(() => [...document.querySelectorAll('[data-testid=span-row]')].map((r) => ({
      span_id: r.dataset.spanId,
      parent_span_id: r.dataset.parentSpanId,
      name: r.dataset.name,
      kind: r.dataset.kind,
      duration_us: Number(r.dataset.durationUs),
      self_us: Number(r.dataset.selfUs),
    })));
    const longest = spans.reduce((a, b) => (b.self_us > a.self_us ? b : a));
    const selectSpan = async (spanId) => {
      await page.click(`[data-testid=span-row][data-span-id=${JSON.stringify(spanId)}]`);
      clicks++;
      await waitFor(page, `the access-log lines of span ${spanId}`, (id) => {
        const box = document.querySelector('[data-testid=span-logs]');
        return box && box.dataset.spanId === id && box.dataset.state === 'loaded';
      }, spanId, STEP_TIMEOUT);
    };
    await shot(page, 'slow-2.png');
    await selectSpan(longest.span_id);

    const from = await page.evaluate(() => document.querySelector('[data-testid=span-logs]').dataset.from);
    const shown = spans.find((x) => x.span_id === from) || longest;
    await shot(page, 'slow-3.png');

    const logLines = await page.evaluate(() => [...document.querySelectorAll('[data-testid=span-logs] [data-testid=log-line]')].map((l) => ({
      span_id: l.dataset.spanId,
      path: l.dataset.path,
      response_code: l.dataset.responseCode === '' ? null : Number(l.dataset.responseCode),
      duration: l.dataset.duration === '' ? null : Number(l.dataset.duration),
      reporter: l.dataset.reporter,
    })));
    const result = {
      clicks,
      trace_id: traceId,
      trace_duration_ms: traceDurationMs,
      longest_span: { name: longest.name, kind: longest.kind, duration_us: longest.duration_us, self_us: longest.self_us, span_id: longest.span_id },
      // The span whose log lines are shown: the longest span's own, or for an application's
      // span those of the request that carried it.
      logged_span_id: shown.span_id,
      logs_of: { name: shown.name, kind: shown.kind, span_id: shown.span_id },
      log_lines: logLines,
    };
    if (spanName && longest.name !== spanName) {
      throw new Failure(`the span with the most self time is "${longest.name}", not "${spanName}"`, { result, spans });
    }
    return result;
  },

  async finding(page) {
    const file = env('EXPECT_FILE');
    const present = env('EXPECT_PRESENT') === '1';
    let start = Date.now();
    await open(page, '#/config');
    // With EDIT_FILE and EDIT_FROM, the edit is made here, once the page shows the config, so
    // the time measured is from the edit to the page showing its outcome.
    const editFile = process.env.EDIT_FILE;
    if (editFile) {
      await waitFor(page, 'the config view', () => document.body.dataset.ready === 'config', {});
      const tmp = `${editFile}.edit-tmp`;
      fs.copyFileSync(env('EDIT_FROM'), tmp);
      fs.renameSync(tmp, editFile);
      start = Date.now();
    }
    const found = await waitFor(page, present ? `a finding in a file ending with ${file}` : `no finding in a file ending with ${file}`, ({ file, present }) => {
      if (document.body.dataset.ready !== 'config') return false;
      const row = [...document.querySelectorAll('[data-testid=finding]')].find((r) => r.dataset.file.endsWith(file));
      if (present !== !!row) return false;
      return row ? { code: row.dataset.code, severity: row.dataset.severity, file: row.dataset.file, line: Number(row.dataset.line), column: Number(row.dataset.column) } : { none: true };
    }, { file, present });
    const elapsed = Date.now() - start;
    const generation = await page.evaluate(() => Number(document.querySelector('[data-testid=config-generation]')?.dataset.generation));
    if (present) {
      await page.locator(`[data-testid=finding][data-file=${JSON.stringify(found.file)}]`).first().scrollIntoViewIfNeeded();
      await shot(page, 'config-finding.png');
      return { present: true, elapsed_ms: elapsed, generation, code: found.code, severity: found.severity, file: found.file, line: found.line, column: found.column };
    }
    return { present: false, elapsed_ms: elapsed, generation };
  },

  async proxy(page) {
    const name = env('PROXY_NAME');
    const state = env('EXPECT_STATE');
    const start = Date.now();
    await open(page, '#/config');
    const row = await waitFor(page, `proxy ${name} in state ${state}`, ({ name, state }) => {
      const r = [...document.querySelectorAll('[data-testid=proxy-row]')].find((x) => x.dataset.name === name && x.dataset.state === state);
      return r ? { namespace: r.dataset.namespace, id: r.dataset.id, connected: r.dataset.connected === 'true' } : false;
    }, { name, state });
    const elapsed = Date.now() - start;
    await page.locator(`[data-testid=proxy-row][data-name=${JSON.stringify(name)}]`).first().scrollIntoViewIfNeeded();
    await shot(page, `config-proxy-${state.replace(/[^a-z0-9_-]/gi, '_')}.png`);
    return { name, state, elapsed_ms: elapsed, namespace: row.namespace, id: row.id, connected: row.connected };
  },
};

// ---------------------------------------------------------------------------
// Main
// ---------------------------------------------------------------------------

/** The browser BROWSER names, headless. */
async function launch() {
  if (BROWSER === 'chromium') {
    return chromium.launch({ executablePath: CHROMIUM, args: ['--no-sandbox', '--disable-dev-shm-usage', '--disable-gpu'] });
  }
  if (BROWSER === 'firefox') return firefox.launch({ channel: 'moz-firefox', executablePath: FIREFOX });
  throw new Failure(`BROWSER must be chromium or firefox, not "${BROWSER}"`);
}

async function main() {
  if (!scenarios[scenario]) {
    console.error(`usage: node driver.mjs <${Object.keys(scenarios).join('|')}>`);
    process.stdout.write(JSON.stringify({ error: `unknown scenario "${scenario}"` }) + '\n');
    return 1;
  }
  const missing = REQUIRED_ENV[scenario].filter((name) => !process.env[name]);
  if (missing.length) {
    const error = `scenario "${scenario}" needs ${missing.join(', ')}`;
    console.error('console driver: ' + error);
    process.stdout.write(JSON.stringify({ error, scenario }) + '\n');
    return 1;
  }
  fs.mkdirSync(SHOTS, { recursive: true });
  const consoleErrors = [];
  let browser;
  let page;
  try {
    browser = await launch();
    const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
    page = await context.newPage();
    page.setDefaultTimeout(STEP_TIMEOUT);
    page.on('console', (m) => {
      if (m.type() === 'error') consoleErrors.push(m.text());
    });
    page.on('pageerror', (e) => consoleErrors.push('uncaught: ' + e.message));
    // The page must make no request outside the console (scripts, styles and fonts included),
    // and must throw no uncaught error.
    const origin = new URL(BASE).origin;
    const external = [];
    let requests = 0;
    page.on('request', (r) => {
      requests += 1;
      const u = new URL(r.url());
      if (u.protocol !== 'data:' && u.origin !== origin) external.push(r.url());
    });
    const result = await scenarios[scenario](page);
    if (external.length) throw new Failure(`the page requested outside the console: ${external.slice(0, 5).join(', ')}`, { external });
    const uncaught = consoleErrors.filter((m) => m.startsWith('uncaught: '));
    if (uncaught.length) throw new Failure(`the page threw: ${uncaught[0]}`, { uncaught });
    result.requests = requests;
    result.browser = `${BROWSER} ${browser.version()}`;
    process.stdout.write(JSON.stringify(result) + '\n');
    return 0;
  } catch (e) {
    let details = e instanceof Failure ? e.details : undefined;
    if (page && !details) details = await pageState(page);
    if (page) await shot(page, `${scenario}-failure.png`).catch(() => {});
    // Playwright's messages carry a colored call log: keep the text only.
    const message = String(e.message).replace(/\u001b\[[0-9;]*m/g, '');
    const failure = { error: message, scenario, details, console_errors: consoleErrors.slice(-10) };
    process.stdout.write(JSON.stringify(failure) + '\n');
    console.error(`console driver: scenario "${scenario}" failed: ${message}`);
    if (details) console.error('page state: ' + JSON.stringify(details, null, 2));
    if (consoleErrors.length) console.error('browser console errors:\n  ' + consoleErrors.slice(-10).join('\n  '));
    console.error(`screenshots in ${SHOTS}`);
    return 1;
  } finally {
    if (browser) await browser.close().catch(() => {});
  }
}

process.exitCode = await main();
