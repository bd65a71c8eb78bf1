// The city on a map: every site and device with a position (inventory columns `lat`, `lon`,
// WGS-84), coloured by its worst active incident and ringed by its health, live from the
// incident stream. Works with no network: by default it draws no tiles, only the sites' own
// bounding box in Web Mercator with a scale bar. An optional tile URL template (`{z}/{x}/{y}`,
// the centre's own tile server) is set in the page and kept in localStorage; Chinese tile
// servers draw in GCJ-02, so positions are converted only when that datum is chosen.
// Plain SVG, no library.

import { api } from './api.js';
import { actionButtons, incidents, onIncidents, openDrawer, showError } from './app.js';
import { ago, dateTime, esc, parseTime, SEVERITY_RANK } from './format.js';
import { t, tr } from './i18n.js';

const TILES_KEY = 'citywatch.map.tiles';
const DATUM_KEY = 'citywatch.map.datum';
const ACTIVE = ['open', 'acknowledged', 'dispatched'];
const BAD_HEALTH = ['offline', 'faulted', 'stale', 'low_battery', 'stuck', 'clock_skew', 'never_reported'];
const HEIGHT = 620;
const PAGE = 1000;

let root = null;
let devices = [];
let timer = 0;
let view = null; // { cx, cy, scale }: centre in Mercator units (0..1), screen px per unit
let userView = false; // zoomed or panned by hand: stop fitting every site in on each redraw
let detailSite = null;
let tiles = localStorage.getItem(TILES_KEY) || '';
let datum = localStorage.getItem(DATUM_KEY) === 'gcj02' ? 'gcj02' : 'wgs84';

// ---- datum and projection -----------------------------------------------------------------

/// WGS-84 → GCJ-02 (the published "Mars coordinates" offset); identity outside China.
export function wgs84ToGcj02(lat, lon) {
  if (lon < 72.004 || lon > 137.8347 || lat < 0.8293 || lat > 55.8271) return [lat, lon];
  const a = 6378245.0, ee = 0.00669342162296594323;
  const x = lon - 105.0, y = lat - 35.0;
  let dLat = -100.0 + 2.0 * x + 3.0 * y + 0.2 * y * y + 0.1 * x * y + 0.2 * Math.sqrt(Math.abs(x));
  dLat += ((20.0 * Math.sin(6.0 * x * Math.PI) + 20.0 * Math.sin(2.0 * x * Math.PI)) * 2.0) / 3.0;
  dLat += ((20.0 * Math.sin(y * Math.PI) + 40.0 * Math.sin((y / 3.0) * Math.PI)) * 2.0) / 3.0;
  dLat += ((160.0 * Math.sin((y / 12.0) * Math.PI) + 320 * Math.sin((y * Math.PI) / 30.0)) * 2.0) / 3.0;
  let dLon = 300.0 + x + 2.0 * y + 0.1 * x * x + 0.1 * x * y + 0.1 * Math.sqrt(Math.abs(x));
  dLon += ((20.0 * Math.sin(6.0 * x * Math.PI) + 20.0 * Math.sin(2.0 * x * Math.PI)) * 2.0) / 3.0;
  dLon += ((20.0 * Math.sin(x * Math.PI) + 40.0 * Math.sin((x / 3.0) * Math.PI)) * 2.0) / 3.0;
  dLon += ((150.0 * Math.sin((x / 12.0) * Math.PI) + 300.0 * Math.sin((x / 30.0) * Math.PI)) * 2.0) / 3.0;
  const radLat = (lat / 180.0) * Math.PI;
  let magic = Math.sin(radLat);
  magic = 1 - ee * magic * magic;
  const sqrtMagic = Math.sqrt(magic);
  dLat = (dLat * 180.0) / (((a * (1 - ee)) / (magic * sqrtMagic)) * Math.PI);
  dLon = (dLon * 180.0) / ((a / sqrtMagic) * Math.cos(radLat) * Math.PI);
  return [lat + dLat, lon + dLon];
}

/// Web Mercator, 0..1 both ways (the tile grid at zoom 0), from the datum the map draws in.
function project(lat, lon) {
  const [la, lo] = tiles && datum === 'gcj02' ? wgs84ToGcj02(lat, lon) : [lat, lon];
  const s = Math.sin((Math.max(-85.05, Math.min(85.05, la)) * Math.PI) / 180);
  return [(lo + 180) / 360, 0.5 - Math.log((1 + s) / (1 - s)) / (4 * Math.PI)];
}

const EARTH_CIRCUMFERENCE_M = 40075016.686;
/// Metres per screen pixel at a Mercator y (0..1).
function metresPerPixel(my, scale) {
  const lat = Math.atan(Math.sinh(Math.PI * (1 - 2 * my)));
  return (EARTH_CIRCUMFERENCE_M * Math.cos(lat)) / scale;
}

// ---- state: sites, their colours ------------------------------------------------------------

const hasPosition = (d) => Number.isFinite(d.lat) && Number.isFinite(d.lon);

function worst(list) {
  let best = null;
  for (const i of list) if (!best || (SEVERITY_RANK[i.severity] ?? 0) > (SEVERITY_RANK[best.severity] ?? 0)) best = i;
  return best;
}

/// Active incidents by device and by site (a site-scoped incident counts for its site only).
function activeIncidents() {
  const byDevice = new Map(), bySite = new Map();
  for (const i of incidents.values()) {
    if (!ACTIVE.includes(i.state)) continue;
    if (!bySite.has(i.site)) bySite.set(i.site, []);
    bySite.get(i.site).push(i);
    if (i.scope !== 'site') {
      if (!byDevice.has(i.device)) byDevice.set(i.device, []);
      byDevice.get(i.device).push(i);
    }
  }
  return { byDevice, bySite };
}

/// Sites with a position: the mean of their devices' positions.
function sites() {
  const map = new Map();
  for (const d of devices) {
    if (!hasPosition(d)) continue;
    if (!map.has(d.site)) map.set(d.site, { site: d.site, devices: [], lat: 0, lon: 0 });
    map.get(d.site).devices.push(d);
  }
  for (const s of map.values()) {
    s.lat = s.devices.reduce((a, d) => a + d.lat, 0) / s.devices.length;
    s.lon = s.devices.reduce((a, d) => a + d.lon, 0) / s.devices.length;
  }
  return [...map.values()].sort((a, b) => a.site.localeCompare(b.site));
}

const healthClass = (list) => {
  const bad = list.flatMap((d) => d.health_flags ?? [d.health]).filter((h) => BAD_HEALTH.includes(h));
  return bad.length ? BAD_HEALTH.find((h) => bad.includes(h)) : 'online';
};

// ---- view lifecycle -------------------------------------------------------------------------

export function init() {
  onIncidents(() => {
    if (root && !root.hidden) draw();
    if (detailSite) renderSite(detailSite);
  });
}

export function show(el) {
  root = el;
  if (!el.dataset.built) build();
  refresh();
  clearInterval(timer);
  timer = setInterval(refresh, 10000);
}

export function hide() {
  clearInterval(timer);
  detailSite = null;
}

export function closeDetail() { detailSite = null; }

export function relabel() {
  if (root?.dataset.built) { build(); draw(); }
}

/// Every device, page by page when the API pages (`next_cursor`), else the one list.
async function loadDevices() {
  const all = [];
  let cursor = '';
  for (let page = 0; page < 1000; page++) {
    const data = await api(`/api/v1/devices?limit=${PAGE}${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ''}`);
    all.push(...data.devices);
    cursor = data.next_cursor ?? '';
    if (!cursor) break;
  }
  return all;
}

async function refresh() {
  try {
    devices = await loadDevices();
    draw();
    if (detailSite) renderSite(detailSite);
  } catch (e) { showError(e); }
}

function build() {
  root.dataset.built = 'yes';
  root.innerHTML = `
    <div class="panel map-panel">
      <div class="panel-head">
        <h2>${esc(t('map.title'))} <span class="muted small" id="map-count"></span></h2>
        <div class="toolbar">
          <button type="button" class="ghost small" id="map-fit">${esc(t('map.fit'))}</button>
          <label class="small muted">${esc(t('map.tiles'))}
            <input id="map-tiles" class="map-tiles" placeholder="http://tiles.local/{z}/{x}/{y}.png" value="${esc(tiles)}"></label>
          <select id="map-datum" title="${esc(t('map.datum'))}">
            <option value="wgs84" ${datum === 'wgs84' ? 'selected' : ''}>${esc(t('map.datum.wgs84'))}</option>
            <option value="gcj02" ${datum === 'gcj02' ? 'selected' : ''}>${esc(t('map.datum.gcj02'))}</option>
          </select>
          <button type="button" class="ghost small" id="map-apply">${esc(t('map.apply'))}</button>
        </div>
      </div>
      <div class="map-box" id="map-box"><svg id="map" class="map" role="img" aria-label="${esc(t('map.title'))}"></svg></div>
      <div class="map-legend">
        ${['critical', 'major', 'warning', 'info'].map((s) => `<span><i class="dot sev-${s}"></i>${esc(tr('severity', s))}</span>`).join('')}
        <span><i class="dot sev-none"></i>${esc(t('map.noIncident'))}</span>
        <span><i class="ring h-ring-offline"></i>${esc(t('map.healthRing'))}</span>
        <span class="muted">${esc(t('map.datumNote'))}</span>
      </div>
      <p id="map-empty" class="empty" hidden>${esc(t('map.empty'))}</p>
    </div>`;
  const svg = root.querySelector('#map');
  root.querySelector('#map-fit').addEventListener('click', () => { userView = false; draw(); });
  root.querySelector('#map-apply').addEventListener('click', () => {
    tiles = root.querySelector('#map-tiles').value.trim();
    datum = root.querySelector('#map-datum').value === 'gcj02' ? 'gcj02' : 'wgs84';
    if (tiles) localStorage.setItem(TILES_KEY, tiles); else localStorage.removeItem(TILES_KEY);
    localStorage.setItem(DATUM_KEY, datum);
    userView = false;
    draw();
  });
  svg.addEventListener('click', (ev) => {
    const g = ev.target.closest('[data-site]');
    if (g && !dragged) location.hash = `#/map/site/${encodeURIComponent(g.dataset.site)}`;
  });
  svg.addEventListener('wheel', (ev) => {
    if (!view) return;
    ev.preventDefault();
    const rect = svg.getBoundingClientRect();
    const factor = ev.deltaY < 0 ? 1.25 : 0.8;
    const px = ev.clientX - rect.left - rect.width / 2, py = ev.clientY - rect.top - rect.height / 2;
    // Keep the point under the cursor where it is.
    view.cx += px / view.scale - px / (view.scale * factor);
    view.cy += py / view.scale - py / (view.scale * factor);
    view.scale = Math.min(2 ** 30, Math.max(256, view.scale * factor));
    userView = true;
    draw();
  }, { passive: false });
  let drag = null, dragged = false;
  svg.addEventListener('pointerdown', (ev) => { if (view) { drag = { x: ev.clientX, y: ev.clientY, cx: view.cx, cy: view.cy }; dragged = false; } });
  window.addEventListener('pointermove', (ev) => {
    if (!drag) return;
    const dx = ev.clientX - drag.x, dy = ev.clientY - drag.y;
    if (Math.abs(dx) + Math.abs(dy) > 3) dragged = true;
    if (!dragged) return;
    view.cx = drag.cx - dx / view.scale;
    view.cy = drag.cy - dy / view.scale;
    userView = true;
    draw();
  });
  window.addEventListener('pointerup', () => { drag = null; setTimeout(() => { dragged = false; }, 0); });
}

/// Fits the sites' bounding box into the box, with a margin; a lone site gets ~2 km across.
function fit(points, width, height) {
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  const spanX = Math.max(x1 - x0, 2000 / EARTH_CIRCUMFERENCE_M), spanY = Math.max(y1 - y0, 2000 / EARTH_CIRCUMFERENCE_M);
  return { cx: (x0 + x1) / 2, cy: (y0 + y1) / 2, scale: Math.min((width - 120) / spanX, (height - 100) / spanY) };
}

/// A round length (1, 2, 5 × 10ⁿ m) about a fifth of the width, as a bar with its label.
function scaleBar(width, height) {
  const mpp = metresPerPixel(view.cy, view.scale);
  const target = (width / 5) * mpp;
  const mag = 10 ** Math.floor(Math.log10(target));
  const metres = [5, 2, 1].map((f) => f * mag).find((m) => m <= target) ?? mag;
  const px = metres / mpp;
  const label = metres >= 1000 ? `${metres / 1000} km` : `${metres} m`;
  const x = 16, y = height - 18;
  return `<g class="scale-bar" data-metres="${metres}"><rect x="${x - 6}" y="${y - 20}" width="${px + 12}" height="30" rx="4" class="scale-bg"/>
    <path d="M${x},${y - 6}V${y}H${x + px}V${y - 6}" class="scale-line"/><text x="${x + px / 2}" y="${y - 8}" text-anchor="middle" class="scale-text">${label}</text></g>`;
}

function tileLayer(width, height) {
  if (!tiles) return '';
  const z = Math.max(0, Math.min(19, Math.round(Math.log2(view.scale / 256))));
  const n = 2 ** z, size = view.scale / n;
  const left = view.cx - width / 2 / view.scale, top = view.cy - height / 2 / view.scale;
  const out = [];
  for (let tx = Math.floor(left * n); tx < (left + width / view.scale) * n; tx++) {
    for (let ty = Math.max(0, Math.floor(top * n)); ty < Math.min(n, (top + height / view.scale) * n); ty++) {
      const wx = ((tx % n) + n) % n;
      const href = tiles.replace('{z}', z).replace('{x}', wx).replace('{y}', ty);
      out.push(`<image href="${esc(href)}" x="${((tx / n - left) * view.scale).toFixed(1)}" y="${((ty / n - top) * view.scale).toFixed(1)}" width="${(size + 0.5).toFixed(1)}" height="${(size + 0.5).toFixed(1)}"/>`);
    }
  }
  return `<g class="tiles">${out.join('')}</g>`;
}

function draw() {
  if (!root?.dataset.built) return;
  const svg = root.querySelector('#map');
  const width = Math.max(320, root.querySelector('#map-box').clientWidth || 1000);
  const height = HEIGHT;
  svg.setAttribute('viewBox', `0 0 ${width} ${height}`);
  svg.setAttribute('height', String(height));
  const all = sites();
  const placed = devices.filter(hasPosition);
  root.querySelector('#map-count').textContent = t('map.count', { sites: all.length, devices: placed.length, unplaced: devices.length - placed.length });
  root.querySelector('#map-empty').hidden = all.length > 0;
  if (!all.length) { svg.innerHTML = ''; svg.dataset.sites = '0'; return; }
  const devicePoints = new Map(placed.map((d) => [d.id, project(d.lat, d.lon)]));
  if (!view || !userView) view = fit([...devicePoints.values()], width, height);
  const sx = (p) => (p[0] - view.cx) * view.scale + width / 2;
  const sy = (p) => (p[1] - view.cy) * view.scale + height / 2;
  const { byDevice, bySite } = activeIncidents();
  const parts = [`<rect class="map-bg" x="0" y="0" width="${width}" height="${height}"/>`, tileLayer(width, height)];
  if (!tiles) {
    // A faint graticule so the empty map still reads as a map.
    const mpp = metresPerPixel(view.cy, view.scale);
    const stepPx = 1000 / mpp >= 40 ? 1000 / mpp : 10000 / mpp >= 40 ? 10000 / mpp : 100000 / mpp;
    const ox = ((width / 2 - view.cx * view.scale) % stepPx + stepPx) % stepPx, oy = ((height / 2 - view.cy * view.scale) % stepPx + stepPx) % stepPx;
    const lines = [];
    if (stepPx >= 12) {
      for (let x = ox; x < width; x += stepPx) lines.push(`M${x.toFixed(1)},0V${height}`);
      for (let y = oy; y < height; y += stepPx) lines.push(`M0,${y.toFixed(1)}H${width}`);
    }
    parts.push(`<path class="graticule" d="${lines.join('')}"/>`);
  }
  // Devices first (small), sites over them.
  for (const d of placed) {
    const p = devicePoints.get(d.id);
    const inc = worst(byDevice.get(d.id) ?? []);
    parts.push(`<circle class="device sev-${inc ? esc(inc.severity) : 'none'} h-ring-${healthClass([d])}" cx="${sx(p).toFixed(1)}" cy="${sy(p).toFixed(1)}" r="4" data-device="${esc(d.id)}" data-site="${esc(d.site)}" data-severity="${inc ? esc(inc.severity) : ''}"><title>${esc(d.id)} · ${esc(tr('health', d.health))}${inc ? ' · ' + esc(tr('rule', inc.rule)) : ''}</title></circle>`);
  }
  for (const s of all) {
    const p = project(s.lat, s.lon);
    const x = sx(p), y = sy(p);
    const list = bySite.get(s.site) ?? [];
    const inc = worst(list);
    const health = healthClass(s.devices);
    const sev = inc ? inc.severity : 'none';
    const r = 11 + Math.min(8, Math.sqrt(s.devices.length));
    parts.push(`<g class="site sev-${esc(sev)} h-ring-${health} ${detailSite === s.site ? 'selected' : ''}" data-site="${esc(s.site)}" data-severity="${inc ? esc(inc.severity) : ''}" data-health="${health}" data-incidents="${list.length}" transform="translate(${x.toFixed(1)},${y.toFixed(1)})">
      ${inc?.severity === 'critical' ? `<circle class="halo" r="${r + 6}"/>` : ''}
      <circle class="site-ring" r="${r + 3}"/><circle class="site-dot" r="${r}"/>
      <text class="site-n" y="4" text-anchor="middle">${list.length || s.devices.length}</text>
      <text class="site-label" y="${r + 17}" text-anchor="middle">${esc(s.site)}</text>
      <title>${esc(s.site)} · ${esc(t('map.devices', { n: s.devices.length }))}${inc ? ' · ' + esc(tr('rule', inc.rule)) : ''}</title></g>`);
  }
  parts.push(scaleBar(width, height));
  parts.push(`<text class="map-datum" x="${width - 10}" y="${height - 10}" text-anchor="end">${esc(tiles ? t(`map.datum.${datum}`) : t('map.noTiles'))}</text>`);
  svg.innerHTML = parts.join('');
  svg.dataset.sites = String(all.length);
}

// ---- a site's detail --------------------------------------------------------------------------

export function detail(what, id) {
  if (what !== 'site') return;
  detailSite = id;
  renderSite(id);
  draw();
}

function renderSite(site) {
  const list = devices.filter((d) => d.site === site).sort((a, b) => a.id.localeCompare(b.id));
  const { byDevice } = activeIncidents();
  const siteIncidents = [...incidents.values()].filter((i) => i.site === site && i.state !== 'closed')
    .sort((a, b) => (SEVERITY_RANK[b.severity] ?? 0) - (SEVERITY_RANK[a.severity] ?? 0) || b.opened_ms - a.opened_ms);
  const now = Date.now();
  openDrawer(`
    <div class="drawer-title" data-site="${esc(site)}"><h2>${esc(t('common.site'))} ${esc(site)}</h2>
      <span class="muted">${esc(t('map.devices', { n: list.length }))}</span></div>
    <h3>${esc(t('health.incidents'))}</h3>
    ${siteIncidents.length ? `<table class="board compact"><tbody>${siteIncidents.map((i) => `<tr class="inc sev-${esc(i.severity)}" data-incident-id="${esc(i.id)}" data-device="${esc(i.device)}" data-rule="${esc(i.rule)}">
      <td><span class="sev sev-${esc(i.severity)}">${esc(tr('severity', i.severity))}</span></td>
      <td><a href="#/ops/incident/${encodeURIComponent(i.id)}">${esc(tr('rule', i.rule))}</a><div class="muted small">${esc(i.device)} · ${esc(dateTime(i.opened_ms))}</div></td>
      <td><span class="state state-${esc(i.state)}">${esc(tr('state', i.state))}</span></td>
      <td class="actions">${actionButtons(i)}</td></tr>`).join('')}</tbody></table>` : `<p class="muted">${esc(t('common.none'))}</p>`}
    <h3>${esc(t('health.devices'))}</h3>
    <table class="devices compact"><tbody>${list.map((d) => {
      const inc = worst(byDevice.get(d.id) ?? []);
      return `<tr data-device-id="${esc(d.id)}"><td class="mono"><a href="#/health/device/${encodeURIComponent(d.id)}">${esc(d.id)}</a></td>
        <td>${esc(tr('kind', d.kind))}</td><td>${(d.health_flags ?? [d.health]).map((h) => `<span class="badge h-${esc(h)}">${esc(tr('health', h))}</span>`).join('')}</td>
        <td>${inc ? `<span class="sev sev-${esc(inc.severity)}">${esc(tr('rule', inc.rule))}</span>` : ''}</td>
        <td class="muted small">${esc(d.location ?? '')}</td><td class="muted small">${esc(ago(parseTime(d.last_seen), now))}</td></tr>`;
    }).join('')}</tbody></table>`);
}
