// Operations centre: the live incident board (critical and newest first), summary counts,
// and an incident's detail with its history and a chart of its metric around the trigger.

import { api } from './api.js';
import { incidents, onIncidents, actionButtons, openDrawer, showError } from './app.js';
import { lineChart } from './chart.js';
import { ago, dateTime, esc, num, SEVERITY_RANK } from './format.js';
import { lang, summaryText, t, tr } from './i18n.js';

const FILTERS = {
  active: ['open', 'acknowledged', 'dispatched'],
  unclosed: ['open', 'acknowledged', 'dispatched', 'resolved', 'cleared'],
  closed: ['closed'],
};

let root = null;
let filter = 'unclosed';
let site = '';
let query = '';
let closed = [];
let detailId = null;
const fresh = new Map(); // id → time it arrived live, for the highlight

export function init() {
  onIncidents((changed) => {
    if (changed) fresh.set(changed.id, Date.now());
    if (root && !root.hidden) renderBoard();
    if (detailId && (!changed || changed.id === detailId)) renderDetail(detailId, false);
  });
  setInterval(() => { if (root && !root.hidden) renderBoard(); }, 15000);
}

export function show(el) {
  root = el;
  if (!el.dataset.built) build();
  renderBoard();
}

export function relabel() {
  if (root?.dataset.built) { root.dataset.built = ''; build(); renderBoard(); }
}

function build() {
  root.dataset.built = 'yes';
  root.innerHTML = `
    <div class="tiles" id="ops-tiles"></div>
    <div class="panel">
      <div class="panel-head">
        <h2>${esc(t('ops.board'))}</h2>
        <div class="toolbar">
          <div class="segmented" id="ops-filter">
            ${Object.keys(FILTERS).map((f) => `<button type="button" data-filter="${f}" class="${f === filter ? 'on' : ''}">${esc(t(`ops.filter.${f}`))}</button>`).join('')}
          </div>
          <select id="ops-site"><option value="">${esc(t('common.site'))}: ${esc(t('common.all'))}</option></select>
          <input id="ops-search" type="search" placeholder="${esc(t('common.search'))}" value="${esc(query)}">
        </div>
      </div>
      <table class="board">
        <thead><tr>
          <th>${esc(t('ops.col.severity'))}</th><th>${esc(t('ops.col.incident'))}</th><th>${esc(t('ops.col.state'))}</th>
          <th class="num">${esc(t('ops.col.value'))}</th><th>${esc(t('ops.col.opened'))}</th><th>${esc(t('ops.col.actions'))}</th>
        </tr></thead>
        <tbody id="ops-rows"></tbody>
      </table>
      <p id="ops-empty" class="empty" hidden>${esc(t('ops.empty'))}</p>
    </div>`;
  root.querySelector('#ops-filter').addEventListener('click', async (ev) => {
    const b = ev.target.closest('button[data-filter]');
    if (!b) return;
    filter = b.dataset.filter;
    for (const x of root.querySelectorAll('#ops-filter button')) x.classList.toggle('on', x === b);
    if (filter === 'closed') {
      try { closed = (await api('/api/v1/incidents?state=closed&limit=200')).incidents; } catch (e) { showError(e); }
    }
    renderBoard();
  });
  root.querySelector('#ops-site').addEventListener('change', (ev) => { site = ev.target.value; renderBoard(); });
  root.querySelector('#ops-search').addEventListener('input', (ev) => { query = ev.target.value.trim().toLowerCase(); renderBoard(); });
  root.querySelector('#ops-rows').addEventListener('click', (ev) => {
    const tr = ev.target.closest('tr[data-incident-id]');
    if (tr && !ev.target.closest('button')) location.hash = `#/ops/incident/${encodeURIComponent(tr.dataset.incidentId)}`;
  });
}

const byPriority = (a, b) => (SEVERITY_RANK[b.severity] ?? 0) - (SEVERITY_RANK[a.severity] ?? 0) || b.opened_ms - a.opened_ms;

function renderTiles(all) {
  const count = (pred) => all.filter(pred).length;
  const tiles = [
    ['critical', t('ops.critical'), count((i) => i.severity === 'critical' && i.state === 'open')],
    ['open', t('ops.open'), count((i) => i.state === 'open')],
    ['acknowledged', t('ops.acknowledged'), count((i) => i.state === 'acknowledged')],
    ['dispatched', t('ops.dispatched'), count((i) => i.state === 'dispatched')],
    ['review', t('ops.review'), count((i) => i.state === 'resolved' || i.state === 'cleared')],
  ];
  root.querySelector('#ops-tiles').innerHTML = tiles
    .map(([k, label, n]) => `<div class="tile tile-${k} ${n ? 'lit' : ''}" data-tile="${k}"><div class="tile-n">${n}</div><div class="tile-label">${esc(label)}</div></div>`)
    .join('');
}

function renderBoard() {
  if (!root?.dataset.built) return;
  const all = [...incidents.values()];
  renderTiles(all);
  const sites = [...new Set(all.map((i) => i.site))].sort();
  const sel = root.querySelector('#ops-site');
  if (sel.options.length - 1 !== sites.length) {
    sel.innerHTML = `<option value="">${esc(t('common.site'))}: ${esc(t('common.all'))}</option>` + sites.map((s) => `<option ${s === site ? 'selected' : ''}>${esc(s)}</option>`).join('');
  }
  // Closed ones: those read on choosing the filter, and those closed live since (newest revision wins).
  const source = filter === 'closed'
    ? [...new Map([...closed, ...all.filter((i) => i.state === 'closed')].map((i) => [i.id, i])).values()]
    : all;
  const rows = source
    .filter((i) => FILTERS[filter].includes(i.state))
    .filter((i) => !site || i.site === site)
    .filter((i) => !query || `${i.device} ${i.site} ${i.rule} ${tr('rule', i.rule)} ${i.summary} ${i.summary_zh ?? ''}`.toLowerCase().includes(query))
    .sort(byPriority);
  const now = Date.now();
  root.querySelector('#ops-rows').innerHTML = rows.map((i) => row(i, now)).join('');
  root.querySelector('#ops-empty').hidden = rows.length > 0;
}

function row(i, now) {
  const isFresh = now - (fresh.get(i.id) ?? 0) < 10000;
  const value = i.value === undefined ? '–' : `<b>${esc(num(i.value, i.metric))}</b>${i.threshold === undefined ? '' : ` <span class="muted">/ ${esc(num(i.threshold, i.metric))}</span>`}`;
  return `<tr class="inc sev-${esc(i.severity)} ${isFresh ? 'fresh' : ''}" data-incident-id="${esc(i.id)}" data-device="${esc(i.device)}" data-rule="${esc(i.rule)}" data-state="${esc(i.state)}" data-severity="${esc(i.severity)}">
    <td><span class="sev sev-${esc(i.severity)}">${esc(tr('severity', i.severity))}</span></td>
    <td><div class="inc-title">${esc(tr('rule', i.rule))}${i.escalation ? ` <span class="tag warn">${esc(t('ops.escalation'))} ${i.escalation}</span>` : ''}${i.flapping ? ` <span class="tag">${esc(t('ops.flapping'))}</span>` : ''}</div>
        <div class="muted small">${esc(i.device)} · ${esc(i.site)} · ${esc(tr('kind', i.kind))}</div></td>
    <td><span class="state state-${esc(i.state)}">${esc(tr('state', i.state))}</span>${i.crew ? `<div class="muted small">${esc(i.crew)}</div>` : ''}</td>
    <td class="num">${value}</td>
    <td><div>${esc(dateTime(i.opened_ms))}</div><div class="muted small">${esc(ago(i.opened_ms, now))}</div></td>
    <td class="actions">${actionButtons(i)}</td>
  </tr>`;
}

// ---- detail ---------------------------------------------------------------------------------

/// A history note in the user's language: the gateway's own notes are English sentences of a
/// few known shapes, translated here; an operator's note is shown as written. A system note of
/// another shape (a rule's English summary) is left out of the Chinese board: the action
/// label above it already says what happened.
export function noteText(h) {
  const note = h.note ?? '';
  if (!note || h.actor !== 'system') return note;
  let m;
  if ((m = /^now (\w+)$/.exec(note))) return t('note.now', { severity: tr('severity', m[1]) });
  if ((m = /^condition since (\S+)$/.exec(note))) return t('note.since', { at: dateTime(Date.parse(m[1])) });
  if ((m = /^(close_valve|self_test|silence|set_interval) (\S+)$/.exec(note))) return t('note.command', { cmd: t(`cmd.${m[1]}`), id: m[2] });
  if (/flips are held back/.test(note)) return t('note.flapping');
  return lang === 'zh' ? '' : note;
}

export async function detail(kind, id) {
  if (kind !== 'incident') return;
  detailId = id;
  await renderDetail(id, true);
}

export function closeDetail() { detailId = null; }
export function hide() { detailId = null; }

let chartFor = null;
async function renderDetail(id, fetchFresh) {
  let inc = incidents.get(id) ?? closed.find((i) => i.id === id);
  if (fetchFresh || !inc) {
    try { inc = await api(`/api/v1/incidents/${encodeURIComponent(id)}`); } catch (e) { showError(e); return; }
  }
  if (detailId !== id) return;
  const facts = [
    [t('common.device'), `<a href="#/health/device/${encodeURIComponent(inc.device)}">${esc(inc.device)}</a>`],
    [t('common.site'), esc(inc.site)],
    [t('common.kind'), esc(tr('kind', inc.kind))],
    [t('ops.col.value'), inc.value === undefined ? '–' : `${esc(num(inc.value, inc.metric))}${inc.threshold === undefined ? '' : ' / ' + esc(num(inc.threshold, inc.metric))}`],
    [t('ops.col.opened'), esc(dateTime(inc.opened_ms))],
    [t('ops.updated'), esc(dateTime(inc.updated_ms))],
    [t('ops.count'), esc(inc.count)],
    [t('ops.crew'), esc(inc.crew ?? '–')],
  ];
  const history = [...inc.history].reverse().map((h) => `
    <li class="h-${esc(h.action)}"><div class="h-head"><b>${esc(tr('state', h.action))}</b><span class="muted small">r${h.revision} · ${esc(dateTime(h.at_ms))}</span></div>
    <div class="small">${esc(h.actor === 'system' ? t('common.system') : h.actor)}${noteText(h) ? ` — ${esc(noteText(h))}` : ''}</div></li>`).join('');
  const body = openDrawer(`
    <div class="drawer-title" data-incident-id="${esc(inc.id)}" data-state="${esc(inc.state)}">
      <span class="sev sev-${esc(inc.severity)}">${esc(tr('severity', inc.severity))}</span>
      <h2>${esc(tr('rule', inc.rule))}</h2>
      <span class="state state-${esc(inc.state)}">${esc(tr('state', inc.state))}</span>
    </div>
    <p class="muted" id="inc-summary">${esc(summaryText(inc))}</p>
    <div class="actions">${actionButtons(inc)}</div>
    <dl class="facts">${facts.map(([k, v]) => `<dt>${esc(k)}</dt><dd>${v}</dd>`).join('')}</dl>
    <h3>${esc(t('ops.chart'))}${inc.metric ? ` · ${esc(tr('metric', inc.metric))}` : ''}</h3>
    <div id="inc-chart" class="chart-box">${inc.metric ? `<p class="muted">${esc(t('common.loading'))}</p>` : `<p class="muted">${esc(t('ops.noMetric'))}</p>`}</div>
    <h3>${esc(t('ops.history'))}</h3>
    <ol class="history">${history}</ol>`);
  if (!inc.metric) return;
  // Ten minutes either side of the trigger (up to now).
  const from = inc.opened_ms - 600e3;
  const to = Math.min(Date.now(), inc.opened_ms + 600e3) + 1000;
  const key = `${inc.id}:${inc.revision}`;
  if (chartFor?.key === key) { body.querySelector('#inc-chart').innerHTML = chartFor.svg; return; }
  try {
    const r = await api(`/api/v1/devices/${encodeURIComponent(inc.device)}/readings?metric=${inc.metric}&from=${Math.round(from)}&to=${Math.round(to)}&limit=5000`);
    const svg = lineChart(r.points, { from, to, metric: inc.metric, threshold: inc.threshold, marker: inc.opened_ms, emptyText: t('health.noData') });
    chartFor = { key, svg };
    const box = document.querySelector('#inc-chart');
    if (box && detailId === id) box.innerHTML = svg;
  } catch (e) { showError(e); }
}
