// Sensor health: counts by health state per site and kind, a filterable device table
// (offline, low battery, stuck, faulted, never reported, not in the inventory, inspection due, …) and a device's detail with
// charts of its metrics over a chosen range, and its incidents.

import { api, apiAll } from './api.js';
import { openDrawer, showError } from './app.js';
import { lineChart } from './chart.js';
import { ago, COMMON_METRICS, dateTime, esc, KIND_METRICS, num, parseTime } from './format.js';
import { t, tr } from './i18n.js';
import { loadMaintenance } from './maintenance.js';

const MAX_ROWS = 500;
const HEALTH = ['online', 'offline', 'stale', 'low_battery', 'stuck', 'faulted', 'never_reported', 'not_in_inventory'];
const FILTERS = ['all', 'offline', 'stale', 'low_battery', 'stuck', 'faulted', 'never_reported', 'not_in_inventory', 'inspection_due'];
const RANGES = { '1h': [3600e3, null], '6h': [6 * 3600e3, '1m'], '24h': [86400e3, '5m'], '7d': [7 * 86400e3, '30m'], '30d': [30 * 86400e3, '2h'] };

let root = null;
let devices = [];
let due = new Set();
let filter = 'all';
let site = '';
let kind = '';
let query = '';
let timer = 0;
let detailId = null;
let range = '1h';

export function show(el) {
  root = el;
  if (!el.dataset.built) build();
  refresh();
  clearInterval(timer);
  timer = setInterval(refresh, 10000);
}

export function hide() {
  clearInterval(timer);
  detailId = null;
}

export function closeDetail() { detailId = null; }

export function relabel() {
  if (root?.dataset.built) { build(); render(); }
}

async function refresh() {
  try {
    devices = (await apiAll('/api/v1/devices', 'devices')).devices;
    const maint = await loadMaintenance(devices).catch(() => null);
    due = new Set((maint?.items ?? []).filter((i) => i.days_left <= 30).map((i) => i.device));
    render();
  } catch (e) { showError(e); }
}

function build() {
  root.dataset.built = 'yes';
  root.innerHTML = `
    <div class="tiles" id="health-tiles"></div>
    <div class="panel">
      <div class="panel-head"><h2>${esc(t('health.bySite'))}</h2></div>
      <table class="matrix" id="health-matrix"></table>
    </div>
    <div class="panel">
      <div class="panel-head">
        <h2>${esc(t('health.devices'))} <span class="muted small" id="health-shown"></span></h2>
        <div class="toolbar">
          <div class="chips" id="health-filter">${FILTERS.map((f) => `<button type="button" data-filter="${f}" class="chip ${f === filter ? 'on' : ''} h-${f}">${esc(f === 'all' ? t('common.all') : f === 'inspection_due' ? t('health.inspectionDue') : tr('health', f))}</button>`).join('')}</div>
          <select id="health-site"></select>
          <select id="health-kind"><option value="">${esc(t('common.kind'))}: ${esc(t('common.all'))}</option>${Object.keys(KIND_METRICS).map((k) => `<option value="${k}" ${k === kind ? 'selected' : ''}>${esc(tr('kind', k))}</option>`).join('')}</select>
          <input id="health-search" type="search" placeholder="${esc(t('common.search'))}" value="${esc(query)}">
        </div>
      </div>
      <table class="devices">
        <thead><tr><th>${esc(t('health.col.id'))}</th><th>${esc(t('common.site'))}</th><th>${esc(t('common.kind'))}</th><th>${esc(t('health.col.health'))}</th>
        <th>${esc(t('health.col.reading'))}</th><th class="num">${esc(t('health.col.battery'))}</th><th class="num">${esc(t('health.col.rssi'))}</th><th>${esc(t('health.col.lastSeen'))}</th></tr></thead>
        <tbody id="health-rows"></tbody>
      </table>
    </div>`;
  root.querySelector('#health-filter').addEventListener('click', (ev) => {
    const b = ev.target.closest('button[data-filter]');
    if (b) setFilter(b.dataset.filter);
  });
  root.querySelector('#health-tiles').addEventListener('click', (ev) => {
    const tile = ev.target.closest('[data-health]');
    if (tile) setFilter(tile.dataset.health === 'online' ? 'all' : tile.dataset.health);
  });
  root.querySelector('#health-site').addEventListener('change', (ev) => { site = ev.target.value; render(); });
  root.querySelector('#health-kind').addEventListener('change', (ev) => { kind = ev.target.value; render(); });
  root.querySelector('#health-search').addEventListener('input', (ev) => { query = ev.target.value.trim().toLowerCase(); render(); });
  root.querySelector('#health-rows').addEventListener('click', (ev) => {
    const row = ev.target.closest('tr[data-device-id]');
    if (row) location.hash = `#/health/device/${encodeURIComponent(row.dataset.deviceId)}`;
  });
}

function setFilter(f) {
  filter = f;
  for (const x of root.querySelectorAll('#health-filter button')) x.classList.toggle('on', x.dataset.filter === f);
  render();
}

const matches = (d) =>
  (filter === 'all' || (filter === 'inspection_due' ? due.has(d.id) : d.health_flags.includes(filter))) &&
  (!site || d.site === site) && (!kind || d.kind === kind) &&
  (!query || `${d.id} ${d.site} ${d.location ?? ''}`.toLowerCase().includes(query));

function render() {
  if (!root?.dataset.built) return;
  const counts = Object.fromEntries(HEALTH.map((h) => [h, devices.filter((d) => d.health === h).length]));
  root.querySelector('#health-tiles').innerHTML =
    `<div class="tile"><div class="tile-n">${devices.length}</div><div class="tile-label">${esc(t('common.total'))}</div></div>` +
    HEALTH.map((h) => `<div class="tile tile-h-${h} ${counts[h] && h !== 'online' ? 'lit' : ''}" data-health="${h}"><div class="tile-n">${counts[h]}</div><div class="tile-label">${esc(tr('health', h))}</div></div>`).join('') +
    `<div class="tile tile-h-inspection_due ${due.size ? 'lit' : ''}" data-health="inspection_due"><div class="tile-n">${due.size}</div><div class="tile-label">${esc(t('health.inspectionDue'))}</div></div>`;

  const groups = new Map();
  for (const d of devices) {
    const key = `${d.site}\u0000${d.kind}`;
    if (!groups.has(key)) groups.set(key, { site: d.site, kind: d.kind, n: Object.fromEntries(HEALTH.map((h) => [h, 0])), total: 0 });
    const g = groups.get(key);
    g.n[d.health] += 1;
    g.total += 1;
  }
  const sorted = [...groups.values()].sort((a, b) => a.site.localeCompare(b.site) || a.kind.localeCompare(b.kind));
  root.querySelector('#health-matrix').innerHTML =
    `<thead><tr><th>${esc(t('common.site'))}</th><th>${esc(t('common.kind'))}</th>${HEALTH.map((h) => `<th class="num">${esc(tr('health', h))}</th>`).join('')}<th class="num">${esc(t('common.total'))}</th></tr></thead><tbody>` +
    sorted.map((g) => `<tr data-site="${esc(g.site)}" data-kind="${esc(g.kind)}"><td>${esc(g.site)}</td><td>${esc(tr('kind', g.kind))}</td>${HEALTH.map((h) => `<td class="num"><span class="count ${g.n[h] ? `h-${h}` : 'zero'}" data-health="${h}">${g.n[h]}</span></td>`).join('')}<td class="num">${g.total}</td></tr>`).join('') +
    '</tbody>';

  const sites = [...new Set(devices.map((d) => d.site))].sort();
  root.querySelector('#health-site').innerHTML = `<option value="">${esc(t('common.site'))}: ${esc(t('common.all'))}</option>` + sites.map((s) => `<option ${s === site ? 'selected' : ''}>${esc(s)}</option>`).join('');

  // Worst first (the API's health is the worst flag), then by id.
  const rank = (d) => (d.health === 'online' ? HEALTH.length : HEALTH.indexOf(d.health));
  const rows = devices.filter(matches).sort((a, b) => rank(a) - rank(b) || a.id.localeCompare(b.id));
  const now = Date.now();
  root.querySelector('#health-shown').textContent = `${t('health.shown')} ${Math.min(rows.length, MAX_ROWS)} ${t('health.of')} ${rows.length}`;
  // A city has many thousands of devices: the table shows the first MAX_ROWS that match.
  root.querySelector('#health-rows').innerHTML = rows.slice(0, MAX_ROWS).map((d) => {
    const main = KIND_METRICS[d.kind]?.[0];
    const v = main && d.values[main];
    const flags = d.health_flags.map((h) => `<span class="badge h-${h}">${esc(tr('health', h))}</span>`).join('') + (due.has(d.id) ? `<span class="badge h-inspection_due">${esc(t('health.inspectionDue'))}</span>` : '');
    return `<tr data-device-id="${esc(d.id)}" data-health="${esc(d.health)}">
      <td class="mono">${esc(d.id)}</td><td>${esc(d.site)}</td><td>${esc(tr('kind', d.kind))}</td><td>${flags}</td>
      <td>${v ? `${esc(tr('metric', main))} <b>${esc(num(v.value, main))}</b>` : '–'}</td>
      <td class="num">${esc(num(d.battery_v, 'battery_v'))}</td><td class="num">${esc(num(d.rssi_dbm, 'rssi_dbm'))}</td>
      <td>${esc(ago(parseTime(d.last_seen), now))}</td></tr>`;
  }).join('');
}

// ---- device detail ---------------------------------------------------------------------------

export async function detail(what, id) {
  if (what !== 'device') return;
  detailId = id;
  let d;
  try { d = await api(`/api/v1/devices/${encodeURIComponent(id)}`); } catch (e) { showError(e); return; }
  if (detailId !== id) return;
  const metrics = [...(KIND_METRICS[d.kind] ?? []), ...COMMON_METRICS];
  const facts = [
    [t('common.site'), d.site], [t('common.kind'), tr('kind', d.kind)], [t('health.fw'), d.fw ?? '–'],
    [t('health.interval'), `${d.interval_s} s`], [t('health.firstSeen'), dateTime(parseTime(d.first_seen))],
    [t('health.col.lastSeen'), dateTime(parseTime(d.last_seen))], [t('health.location'), d.location ?? '–'],
    [t('health.installDate'), d.install_date ?? '–'],
  ];
  const body = openDrawer(`
    <div class="drawer-title" data-device-id="${esc(d.id)}"><h2 class="mono">${esc(d.id)}</h2>
      ${d.health_flags.map((h) => `<span class="badge h-${h}">${esc(tr('health', h))}</span>`).join('')}</div>
    <dl class="facts">${facts.map(([k, v]) => `<dt>${esc(k)}</dt><dd>${esc(v)}</dd>`).join('')}</dl>
    <div class="panel-head"><h3>${esc(t('health.range'))}</h3>
      <div class="segmented" id="dev-range">${Object.keys(RANGES).map((r) => `<button type="button" data-range="${r}" class="${r === range ? 'on' : ''}">${esc(t(`range.${r}`))}</button>`).join('')}</div></div>
    <div id="dev-charts" class="charts">${metrics.map((m) => `<div class="chart-card" data-metric="${m}"><div class="chart-head">${esc(tr('metric', m))} <span class="muted">${esc(num(d.values[m]?.value ?? (m === 'battery_v' ? d.battery_v : m === 'rssi_dbm' ? d.rssi_dbm : null), m))}</span></div><div class="chart-slot"></div></div>`).join('')}</div>
    <h3>${esc(t('health.incidents'))}</h3>
    <div id="dev-incidents"><p class="muted">${esc(t('common.loading'))}</p></div>`);
  body.querySelector('#dev-range').addEventListener('click', (ev) => {
    const b = ev.target.closest('button[data-range]');
    if (!b) return;
    range = b.dataset.range;
    for (const x of body.querySelectorAll('#dev-range button')) x.classList.toggle('on', x === b);
    charts(id, metrics, body);
  });
  charts(id, metrics, body);
  try {
    const list = await api(`/api/v1/incidents?device=${encodeURIComponent(id)}&limit=50`);
    if (detailId !== id) return;
    body.querySelector('#dev-incidents').innerHTML = list.incidents.length
      ? `<table class="board compact"><tbody>${list.incidents.map((i) => `<tr data-incident-id="${esc(i.id)}"><td><span class="sev sev-${esc(i.severity)}">${esc(tr('severity', i.severity))}</span></td><td><a href="#/ops/incident/${encodeURIComponent(i.id)}">${esc(tr('rule', i.rule))}</a></td><td><span class="state state-${esc(i.state)}">${esc(tr('state', i.state))}</span></td><td class="muted small">${esc(dateTime(i.opened_ms))}</td></tr>`).join('')}</tbody></table>`
      : `<p class="muted">${esc(t('common.none'))}</p>`;
  } catch (e) { showError(e); }
}

async function charts(id, metrics, body) {
  const [span, step] = RANGES[range];
  const to = Date.now() + 1000;
  const from = to - span;
  await Promise.all(metrics.map(async (m) => {
    const slot = body.querySelector(`.chart-card[data-metric="${m}"] .chart-slot`);
    try {
      const q = `metric=${m}&from=${Math.round(from)}&to=${Math.round(to)}${step ? `&step=${step}` : '&limit=5000'}`;
      const r = await api(`/api/v1/devices/${encodeURIComponent(id)}/readings?${q}`);
      if (detailId === id) slot.innerHTML = lineChart(r.points, { from, to, metric: m, emptyText: t('health.noData') });
    } catch (e) { slot.innerHTML = `<p class="error">${esc(e.message)}</p>`; }
  }));
}
