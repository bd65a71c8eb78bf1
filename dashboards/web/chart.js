// A small hand-written SVG time-series chart: the average line, the min–max band when the
// points are steps, an optional threshold line and an optional marker (e.g. the trigger).
// No library: the dashboard must build from the repository alone.

import { esc, num } from './format.js';

const W = 640, H = 200, L = 48, R = 12, T = 12, B = 26;

function niceStep(span, count) {
  const raw = span / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const f = raw / mag;
  return (f < 1.5 ? 1 : f < 3 ? 2 : f < 7 ? 5 : 10) * mag;
}

function timeLabel(ms, spanMs) {
  const d = new Date(ms);
  const p = (n) => String(n).padStart(2, '0');
  return spanMs > 2 * 86400e3 ? `${p(d.getMonth() + 1)}-${p(d.getDate())}` : `${p(d.getHours())}:${p(d.getMinutes())}`;
}

/// SVG markup for `points` ({ts_ms, min, max, avg}) over [from, to] (ms).
export function lineChart(points, { from, to, metric, threshold, marker, emptyText = '' }) {
  const values = points.flatMap((p) => [p.min, p.max]).filter((v) => Number.isFinite(v));
  if (Number.isFinite(threshold)) values.push(threshold);
  if (!points.length) {
    return `<svg class="chart" viewBox="0 0 ${W} ${H}" role="img"><text x="${W / 2}" y="${H / 2}" class="chart-empty" text-anchor="middle">${esc(emptyText)}</text></svg>`;
  }
  let lo = Math.min(...values), hi = Math.max(...values);
  const nonNegative = lo >= 0;
  if (lo === hi) { lo -= Math.abs(lo) * 0.1 || 1; hi += Math.abs(hi) * 0.1 || 1; }
  const pad = (hi - lo) * 0.08;
  lo -= pad; hi += pad;
  // Levels, percentages and flags never go below zero: neither does their axis.
  if (nonNegative) lo = Math.max(lo, 0);
  const step = niceStep(hi - lo, 4);
  lo = Math.floor(lo / step) * step; hi = Math.ceil(hi / step) * step;
  const decimals = Math.max(0, -Math.floor(Math.log10(step) + 1e-9));
  const x = (ms) => L + ((ms - from) / (to - from)) * (W - L - R);
  const y = (v) => T + (1 - (v - lo) / (hi - lo)) * (H - T - B);
  const parts = [];
  for (let v = lo; v <= hi + step / 2; v += step) {
    parts.push(`<line class="grid" x1="${L}" x2="${W - R}" y1="${y(v)}" y2="${y(v)}"/>`);
    parts.push(`<text class="axis" x="${L - 6}" y="${y(v) + 4}" text-anchor="end">${v.toFixed(decimals)}</text>`);
  }
  const span = to - from;
  for (let i = 0; i <= 4; i++) {
    const ms = from + (span * i) / 4;
    parts.push(`<text class="axis" x="${x(ms)}" y="${H - 6}" text-anchor="${i === 0 ? 'start' : i === 4 ? 'end' : 'middle'}">${timeLabel(ms, span)}</text>`);
  }
  const banded = points.some((p) => p.count > 1 && p.max !== p.min);
  if (banded) {
    const top = points.map((p) => `${x(p.ts_ms).toFixed(1)},${y(p.max).toFixed(1)}`);
    const bottom = points.slice().reverse().map((p) => `${x(p.ts_ms).toFixed(1)},${y(p.min).toFixed(1)}`);
    parts.push(`<polygon class="band" points="${top.concat(bottom).join(' ')}"/>`);
  }
  if (Number.isFinite(threshold)) {
    parts.push(`<line class="threshold" x1="${L}" x2="${W - R}" y1="${y(threshold)}" y2="${y(threshold)}"/>`);
    parts.push(`<text class="threshold-label" x="${W - R - 4}" y="${y(threshold) - 4}" text-anchor="end">${num(threshold, metric)}</text>`);
  }
  if (Number.isFinite(marker) && marker >= from && marker <= to) {
    parts.push(`<line class="marker" x1="${x(marker)}" x2="${x(marker)}" y1="${T}" y2="${H - B}"/>`);
  }
  const line = points.map((p, i) => `${i ? 'L' : 'M'}${x(p.ts_ms).toFixed(1)},${y(p.avg).toFixed(1)}`).join('');
  parts.push(`<path class="line" d="${line}"/>`);
  if (points.length <= 60) {
    for (const p of points) parts.push(`<circle class="dot" cx="${x(p.ts_ms).toFixed(1)}" cy="${y(p.avg).toFixed(1)}" r="2.2"><title>${esc(num(p.avg, metric))}</title></circle>`);
  }
  return `<svg class="chart" viewBox="0 0 ${W} ${H}" role="img" data-points="${points.length}">${parts.join('')}</svg>`;
}
