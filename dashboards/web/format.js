// Small shared helpers: HTML escaping, numbers with units, relative and absolute times,
// the metrics of each device kind, and severity order.
import { t, lang } from './i18n.js';

export const esc = (s) => String(s ?? '').replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' })[c]);

export const UNITS = {
  gas_lel: '%LEL', valve_closed: '', temp_c: '°C', smoke_db_m: 'dB/m', co_ppm: 'ppm', tilt_deg: '°',
  vibration_mg: 'mg', corrosion_um: 'µm', section_loss_pct: '%', battery_v: 'V', rssi_dbm: 'dBm',
};

/// The metrics of SPEC §3 by kind, plus the two every device reports.
export const KIND_METRICS = {
  gas_detector: ['gas_lel', 'valve_closed', 'temp_c'],
  smoke_detector: ['smoke_db_m', 'temp_c', 'co_ppm'],
  siren_mount: ['tilt_deg', 'vibration_mg', 'corrosion_um', 'section_loss_pct'],
};
export const COMMON_METRICS = ['battery_v', 'rssi_dbm'];

export const SEVERITY_RANK = { critical: 4, major: 3, warning: 2, info: 1 };

export function num(v, metric) {
  if (v === null || v === undefined || Number.isNaN(v)) return '–';
  const abs = Math.abs(v);
  const digits = abs >= 100 ? 0 : abs >= 10 ? 1 : 2;
  const unit = metric ? UNITS[metric] ?? '' : '';
  return `${Number(v).toFixed(digits)}${unit ? ' ' + unit : ''}`;
}

const pad = (n) => String(n).padStart(2, '0');

/// Local date and time, e.g. 2026-12-02 12:04:05.
export function dateTime(ms) {
  if (!ms) return '–';
  const d = new Date(ms);
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

export function date(ms) {
  if (!ms) return '–';
  const d = new Date(ms);
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}`;
}

export function ago(ms, now = Date.now()) {
  if (!ms) return '–';
  const s = Math.max(0, Math.round((now - ms) / 1000));
  if (s < 5) return t('time.justNow');
  if (s < 60) return t('time.s', { n: s });
  if (s < 3600) return t('time.m', { n: Math.floor(s / 60) });
  if (s < 86400) return t('time.h', { n: Math.floor(s / 3600) });
  return t('time.d', { n: Math.floor(s / 86400) });
}

export const parseTime = (text) => (text ? Date.parse(text) : NaN);

export const isZh = () => lang === 'zh';
