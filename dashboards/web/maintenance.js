// Maintenance: what falls due within 30 days and what is overdue, by site. From the
// maintenance API (`GET /api/v1/inspections`) when the gateway has it; on 404, estimated from
// the devices' install dates + 12 months (first-seen date where none is known), and the page
// says so.

import { api, apiAll, ApiError } from './api.js';
import { showError } from './app.js';
import { date, esc } from './format.js';
import { t, tr } from './i18n.js';

const WINDOW_DAYS = 30;
const DAY = 86400e3;

/// Adds calendar months, clamping to the month's last day (Jan 31 + 1 month = Feb 28/29).
function addMonths(ms, months) {
  const d = new Date(ms);
  const day = d.getUTCDate();
  d.setUTCDate(1);
  d.setUTCMonth(d.getUTCMonth() + months);
  const last = new Date(Date.UTC(d.getUTCFullYear(), d.getUTCMonth() + 1, 0)).getUTCDate();
  d.setUTCDate(Math.min(day, last));
  return d.getTime();
}

/// { source: 'api' | 'fallback', items: [{device, site, kind, task, due_ms, days_left, overdue, …}], later }
/// `devices`: the list of `GET /api/v1/devices` if the caller has it already (for the estimate).
export async function loadMaintenance(devices = null) {
  try {
    const data = await apiAll(`/api/v1/inspections?due_within_days=${WINDOW_DAYS}`, 'items');
    const items = data.items.map((i) => ({ ...i, due_ms: Date.parse(i.due) }));
    return { source: 'api', items, later: [] };
  } catch (e) {
    if (!(e instanceof ApiError && e.status === 404)) throw e;
  }
  devices ??= (await apiAll('/api/v1/devices', 'devices')).devices;
  const now = Date.now();
  const all = devices.map((d) => {
    const installed = d.install_date ? Date.parse(d.install_date) : NaN;
    const basis = Number.isFinite(installed) ? 'install' : 'firstSeen';
    const start = basis === 'install' ? installed : Date.parse(d.first_seen);
    const due = addMonths(start, 12);
    const daysLeft = Math.floor((due - now) / DAY);
    return {
      device: d.id, site: d.site, kind: d.kind, location: d.location ?? null, task: 'inspection',
      due_ms: due, days_left: daysLeft, overdue: due < now, crew: d.crew ?? null, phone: d.phone ?? null,
      last_inspection: null, basis,
    };
  }).sort((a, b) => a.due_ms - b.due_ms);
  return { source: 'fallback', items: all.filter((i) => i.days_left <= WINDOW_DAYS), later: all.filter((i) => i.days_left > WINDOW_DAYS).slice(0, 10) };
}

let root = null;

export function show(el) {
  root = el;
  refresh();
}

export function relabel() { if (root && !root.hidden) refresh(); }

async function refresh() {
  root.innerHTML = `<p class="muted">${esc(t('common.loading'))}</p>`;
  let m;
  try { m = await loadMaintenance(); } catch (e) { showError(e); return; }
  const overdue = m.items.filter((i) => i.overdue);
  const soon = m.items.filter((i) => !i.overdue);
  const sites = [...new Set(m.items.map((i) => i.site))].sort();
  root.innerHTML = `
    <div class="notice ${m.source === 'fallback' ? 'warn' : ''}" data-source="${m.source}">${esc(m.source === 'fallback' ? t('maint.fallback') : t('maint.fromApi'))}</div>
    <div class="tiles">
      <div class="tile tile-critical ${overdue.length ? 'lit' : ''}" data-tile="overdue"><div class="tile-n">${overdue.length}</div><div class="tile-label">${esc(t('maint.overdue'))}</div></div>
      <div class="tile tile-acknowledged ${soon.length ? 'lit' : ''}" data-tile="due30"><div class="tile-n">${soon.length}</div><div class="tile-label">${esc(t('maint.due30'))}</div></div>
      <div class="tile"><div class="tile-n">${sites.length}</div><div class="tile-label">${esc(t('common.site'))}</div></div>
    </div>
    ${sites.map((s) => sitePanel(s, m.items.filter((i) => i.site === s), m.source)).join('')}
    ${m.items.length ? '' : `<div class="panel"><p class="empty">${esc(t('maint.nothing'))}</p></div>`}
    ${m.later.length ? `<div class="panel"><div class="panel-head"><h2>${esc(t('maint.later'))}</h2></div>${table(m.later, m.source)}</div>` : ''}`;
}

function sitePanel(site, items, source) {
  const over = items.filter((i) => i.overdue).length;
  return `<div class="panel" data-site="${esc(site)}">
    <div class="panel-head"><h2>${esc(site)}</h2>
      <div class="toolbar"><span class="badge h-offline">${esc(t('maint.overdue'))} ${over}</span><span class="badge h-low_battery">${esc(t('maint.due30'))} ${items.length - over}</span></div></div>
    ${table(items, source)}</div>`;
}

function table(items, source) {
  const fallback = source === 'fallback';
  return `<table class="maint"><thead><tr><th>${esc(t('common.device'))}</th><th>${esc(t('common.kind'))}</th><th>${esc(t('health.location'))}</th><th>${esc(t('maint.col.task'))}</th>
    <th>${esc(t('maint.col.due'))}</th><th class="num">${esc(t('maint.col.daysLeft'))}</th>
    ${fallback ? `<th>${esc(t('maint.col.basis'))}</th>` : `<th>${esc(t('maint.col.crew'))}</th><th>${esc(t('maint.col.phone'))}</th><th>${esc(t('maint.col.last'))}</th>`}</tr></thead>
    <tbody>${items.map((i) => `<tr data-device="${esc(i.device)}" class="${i.overdue ? 'overdue' : i.days_left <= 7 ? 'soon' : ''}">
      <td class="mono"><a href="#/health/device/${encodeURIComponent(i.device)}">${esc(i.device)}</a></td><td>${esc(tr('kind', i.kind))}</td><td>${esc(i.location ?? '–')}</td>
      <td>${esc(tr('task', i.task))}</td><td>${esc(date(i.due_ms))}</td>
      <td class="num">${i.overdue ? `<span class="over">${esc(t('maint.daysOver', { n: -i.days_left }))}</span>` : `${i.days_left} ${esc(t('maint.days'))}`}</td>
      ${fallback ? `<td class="muted">${esc(t(`maint.basis.${i.basis}`))}</td>` : `<td>${esc(i.crew ?? '–')}</td><td class="mono">${esc(i.phone ?? '–')}</td><td>${esc(i.last_inspection ?? '–')}</td>`}
    </tr>`).join('')}</tbody></table>`;
}
