// The dashboard's shell: language switch, token login, hash routing between the three views
// (operations centre, city map, sensor health, maintenance) and the detail drawer, the live incident
// stream shared by every view, the critical cue (banner + Web Audio beep) and the operator
// action dialog (ack / dispatch / resolve / close with a note).

import { api, ApiError, LiveStream, onUnauthorized, setToken, token } from './api.js';
import { applyStatic, lang, setLang, t, tr } from './i18n.js';
import { dateTime, esc } from './format.js';
import * as ops from './ops.js';
import * as health from './health.js';
import * as maintenance from './maintenance.js';
import * as map from './map.js';

const $ = (sel) => document.querySelector(sel);

// ---- incidents: one map fed by the list and the live stream --------------------------------

/** @type {Map<string, any>} id → the newest revision seen */
export const incidents = new Map();
const incidentListeners = new Set();
export const onIncidents = (fn) => incidentListeners.add(fn);
const notifyIncidents = (changed) => { for (const fn of incidentListeners) fn(changed); };

/// Keeps the newest revision of each incident; a live change that makes a critical incident
/// open (new, or re-opened) sounds the cue.
export function upsert(inc, live = false) {
  const old = incidents.get(inc.id);
  if (old && old.revision >= inc.revision) return false;
  incidents.set(inc.id, inc);
  if (live && inc.severity === 'critical' && inc.state === 'open' && (!old || old.state !== 'open')) criticalCue(inc);
  return true;
}

/// Re-reads every incident not yet closed (first load, and after a resync).
export async function loadIncidents() {
  const data = await api('/api/v1/incidents?state=open,acknowledged,dispatched,resolved,cleared&limit=1000');
  let changed = false;
  for (const inc of data.incidents) changed = upsert(inc) || changed;
  notifyIncidents(null);
  return data;
}

const stream = new LiveStream('/api/v1/events', {
  onEvent(type, data) {
    if (type === 'resync') { loadIncidents().catch(showError); return; }
    if (type !== 'incident') return;
    let inc;
    try { inc = JSON.parse(data); } catch { return; }
    if (upsert(inc, true)) notifyIncidents(inc);
  },
  onState(state) {
    const el = $('#live');
    el.dataset.state = state;
    $('#live-text').textContent = t(`live.${state}`);
  },
  // Subscribed first, then the list: nothing falls between the two (revisions decide).
  onOpen(resumed) {
    document.body.dataset.streamOpens = String(Number(document.body.dataset.streamOpens || 0) + 1);
    document.body.dataset.streamResumed = String(resumed);
    if (!resumed) loadIncidents().catch(showError);
  },
});

// ---- the critical cue -------------------------------------------------------------------------

let audio = null;
let soundOn = localStorage.getItem('citywatch.sound') !== 'off';

function beep() {
  if (!soundOn) return;
  try {
    audio ??= new AudioContext();
    if (audio.state === 'suspended') audio.resume();
    const now = audio.currentTime;
    for (const [i, freq] of [[0, 880], [1, 660], [2, 880]]) {
      const osc = audio.createOscillator();
      const gain = audio.createGain();
      osc.type = 'square';
      osc.frequency.value = freq;
      gain.gain.setValueAtTime(0.0001, now + i * 0.22);
      gain.gain.exponentialRampToValueAtTime(0.18, now + i * 0.22 + 0.02);
      gain.gain.exponentialRampToValueAtTime(0.0001, now + i * 0.22 + 0.2);
      osc.connect(gain).connect(audio.destination);
      osc.start(now + i * 0.22);
      osc.stop(now + i * 0.22 + 0.21);
    }
    document.body.dataset.beeps = String(Number(document.body.dataset.beeps || 0) + 1);
  } catch (e) {
    console.warn('no audio', e);
  }
}

function criticalCue(inc) {
  const banner = $('#critical-banner');
  $('#critical-text').textContent = `${tr('rule', inc.rule)} · ${inc.device} · ${inc.site} · ${dateTime(inc.opened_ms)}`;
  banner.dataset.incidentId = inc.id;
  banner.hidden = false;
  banner.classList.remove('flash');
  void banner.offsetWidth; // restart the animation
  banner.classList.add('flash');
  document.body.dataset.criticalCues = String(Number(document.body.dataset.criticalCues || 0) + 1);
  beep();
}

function renderSound() {
  $('#sound').textContent = t(soundOn ? 'sound.on' : 'sound.off');
  $('#sound').setAttribute('aria-pressed', String(soundOn));
}

// ---- login ----------------------------------------------------------------------------------

let loginOpen = false;
function askForToken(message) {
  stream.stop();
  const dlg = $('#login-dialog');
  const err = $('#login-error');
  err.hidden = !message;
  err.textContent = message || '';
  if (!loginOpen) { loginOpen = true; dlg.showModal(); }
  $('#login-token').focus();
}

onUnauthorized(() => askForToken(token() ? t('auth.wrong') : ''));

$('#login-form').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  setToken($('#login-token').value.trim());
  try {
    // A call the token guards (health may stay open for probes).
    await api('/api/v1/incidents?limit=1');
    loginOpen = false;
    $('#login-dialog').close();
    $('#login-token').value = '';
    $('#logout').hidden = !token();
    stream.start();
    route();
  } catch (e) {
    if (!(e instanceof ApiError && e.status === 401)) showError(e);
  }
});
$('#login-dialog').addEventListener('cancel', (ev) => ev.preventDefault());

$('#logout').addEventListener('click', () => {
  setToken('');
  $('#logout').hidden = true;
  incidents.clear();
  notifyIncidents(null);
  askForToken('');
});

// ---- operator actions -------------------------------------------------------------------------

export const ACTIONS = {
  ack: ['open'],
  dispatch: ['open', 'acknowledged'],
  resolve: ['open', 'acknowledged', 'dispatched', 'cleared'],
  close: ['resolved', 'cleared'],
};
export const allowedActions = (inc) => Object.keys(ACTIONS).filter((a) => ACTIONS[a].includes(inc.state));

export function actionButtons(inc) {
  return allowedActions(inc)
    .map((a, i) => `<button type="button" class="${i === 0 ? 'primary' : 'ghost'} small" data-action="${a}" data-incident-id="${esc(inc.id)}">${esc(t(`action.${a}`))}</button>`)
    .join('');
}

let pending = null;
export function openAction(incidentId, action) {
  const inc = incidents.get(incidentId);
  if (!inc) return;
  pending = { id: incidentId, action };
  $('#action-title').textContent = t(`action.${action}`);
  $('#action-incident').textContent = `${tr('rule', inc.rule)} · ${inc.device} · ${inc.site}`;
  $('#action-actor').value = localStorage.getItem('citywatch.actor') || '';
  $('#action-crew').value = inc.crew || '';
  $('#action-crew-row').hidden = action !== 'dispatch';
  $('#action-crew').required = action === 'dispatch';
  $('#action-note').value = '';
  $('#action-error').hidden = true;
  $('#action-dialog').showModal();
  ($('#action-actor').value ? $('#action-note') : $('#action-actor')).focus();
}

$('#action-cancel').addEventListener('click', () => $('#action-dialog').close());
$('#action-form').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  if (!pending) return;
  const actor = $('#action-actor').value.trim();
  localStorage.setItem('citywatch.actor', actor);
  const body = { actor, note: $('#action-note').value.trim() || null };
  if (pending.action === 'dispatch') body.crew = $('#action-crew').value.trim();
  $('#action-submit').disabled = true;
  try {
    const inc = await api(`/api/v1/incidents/${encodeURIComponent(pending.id)}/${pending.action}`, { method: 'POST', body });
    if (upsert(inc)) notifyIncidents(inc);
    $('#action-dialog').close();
    toast(`${t(`action.${pending.action}`)} · ${t('action.done')}`);
    pending = null;
  } catch (e) {
    const err = $('#action-error');
    err.hidden = false;
    err.textContent = e.status === 409 ? t('action.conflict') + e.message : e.status === 403 ? t('auth.forbidden') : e.message;
  } finally {
    $('#action-submit').disabled = false;
  }
});

// Any action button anywhere on the page.
document.addEventListener('click', (ev) => {
  const btn = ev.target.closest('button[data-action]');
  if (btn) { ev.stopPropagation(); openAction(btn.dataset.incidentId, btn.dataset.action); }
  if (audio?.state === 'suspended') audio.resume();
}, true);

// ---- small UI helpers -----------------------------------------------------------------------

let toastTimer = 0;
export function toast(text, kind = 'ok') {
  const el = $('#toast');
  el.textContent = text;
  el.dataset.kind = kind;
  el.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { el.hidden = true; }, 3500);
}
export function showError(e) {
  if (e instanceof ApiError && e.status === 401) return;
  console.error(e);
  toast(`${t('common.error')}: ${e.message || e}`, 'error');
}

/// The side drawer for an incident's or a device's detail.
export function openDrawer(html) {
  $('#drawer-body').innerHTML = html;
  $('#drawer').hidden = false;
  return $('#drawer-body');
}
export function closeDrawer() {
  $('#drawer').hidden = true;
  $('#drawer-body').innerHTML = '';
}
$('#drawer-close').addEventListener('click', () => {
  const [view] = currentRoute();
  location.hash = `#/${view}`;
});

// ---- routing --------------------------------------------------------------------------------

const VIEWS = { ops, map, health, maintenance };
let shown = null;

function currentRoute() {
  const parts = location.hash.replace(/^#\/?/, '').split('/').map(decodeURIComponent);
  const view = VIEWS[parts[0]] ? parts[0] : 'ops';
  return [view, parts.slice(1)];
}

export function route() {
  const [view, rest] = currentRoute();
  for (const a of document.querySelectorAll('#tabs a')) a.classList.toggle('active', a.dataset.view === view);
  for (const name of Object.keys(VIEWS)) $(`#view-${name}`).hidden = name !== view;
  if (shown !== view) {
    if (shown) VIEWS[shown].hide?.();
    shown = view;
    VIEWS[view].show($(`#view-${view}`));
  }
  if (rest.length >= 2) VIEWS[view].detail?.(rest[0], rest[1]);
  else {
    closeDrawer();
    for (const v of Object.values(VIEWS)) v.closeDetail?.();
  }
}

function rerender() {
  applyStatic();
  $('#lang').textContent = lang === 'zh' ? 'EN' : '中文';
  renderSound();
  $('#live-text').textContent = t(`live.${$('#live').dataset.state}`);
  for (const v of Object.values(VIEWS)) v.relabel?.();
  const [view, rest] = currentRoute();
  if (rest.length >= 2) VIEWS[view].detail?.(rest[0], rest[1]);
}

$('#lang').addEventListener('click', () => { setLang(lang === 'zh' ? 'en' : 'zh'); rerender(); });
$('#sound').addEventListener('click', () => {
  soundOn = !soundOn;
  localStorage.setItem('citywatch.sound', soundOn ? 'on' : 'off');
  renderSound();
  if (soundOn) beep();
});
$('#critical-dismiss').addEventListener('click', () => { $('#critical-banner').hidden = true; });
$('#critical-text').addEventListener('click', () => {
  const id = $('#critical-banner').dataset.incidentId;
  if (id) location.hash = `#/ops/incident/${encodeURIComponent(id)}`;
});
window.addEventListener('hashchange', route);

function tick() {
  const d = new Date();
  const p = (n) => String(n).padStart(2, '0');
  $('#clock').textContent = `${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
}
setInterval(tick, 1000);
tick();

rerender();
$('#logout').hidden = !token();
for (const v of Object.values(VIEWS)) v.init?.();
stream.start();
route();
document.body.dataset.ready = 'true';
