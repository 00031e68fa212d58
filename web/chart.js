// Small hand-drawn SVG line charts over time.
import { h, s, fmtCompact, isNum } from './dom.js';

const W = 480;
const H = 150;
const PAD = { left: 58, right: 10, top: 10, bottom: 22 };

// A round number (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8 x 10^n) at or above v.
function niceCeil(v) {
  if (!(v > 0)) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10]) if (m * p >= v * 0.999) return m * p;
  return 10 * p;
}

function clock(t) {
  return new Date(t * 1000).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', second: '2-digit' });
}

// series: [{label, color, points: [[unixSeconds, value|null], ...]}];
// format: value -> text for the axis and legend; yMax: a fixed top (e.g. a
// capacity), else the data's rounded up. Returns a <figure>.
export function lineChart({ title, series, format = fmtCompact, yMax, id, note, bytes = false, empty }) {
  const all = series.flatMap((se) => se.points.filter((p) => isNum(p[1])));
  const legend = h('div', { class: 'chart-legend' }, series.map((se) => {
    const last = [...se.points].reverse().find((p) => isNum(p[1]));
    return h('span', { class: 'legend-item' },
      h('span', { class: 'legend-swatch', style: { background: se.color } }),
      `${se.label} `, h('strong', {}, last ? format(last[1]) : '—'));
  }));
  const fig = h('figure', { class: 'chart', id },
    h('figcaption', {}, h('span', { class: 'chart-title' }, title), note ? h('span', { class: 'chart-note' }, note) : null),
    legend);
  if (all.length < 2) {
    fig.append(h('div', { class: 'chart-empty' }, all.length ? 'Collecting data…' : empty || 'No data yet'));
    return fig;
  }
  const t0 = Math.min(...all.map((p) => p[0]));
  const t1 = Math.max(...all.map((p) => p[0]));
  const span = Math.max(t1 - t0, 1);
  const max = Math.max(...all.map((p) => p[1]));
  // Bytes: a round number of KiB / MiB / GiB.
  const unit = bytes ? 1024 ** Math.max(0, Math.min(3, Math.floor(Math.log(Math.max(max, 1)) / Math.log(1024)))) : 1;
  const top = isNum(yMax) && yMax > 0 ? yMax : niceCeil(max / unit) * unit;
  const iw = W - PAD.left - PAD.right;
  const ih = H - PAD.top - PAD.bottom;
  const x = (t) => PAD.left + ((t - t0) / span) * iw;
  const y = (v) => PAD.top + ih - (Math.max(0, Math.min(v, top)) / top) * ih;

  const svg = s('svg', { viewBox: `0 0 ${W} ${H}`, class: 'chart-svg', role: 'img', 'aria-label': title });
  for (const f of [0, 0.5, 1]) {
    const gy = y(top * f);
    svg.append(s('line', { x1: PAD.left, x2: W - PAD.right, y1: gy, y2: gy, class: f === 0 ? 'axis' : 'grid' }));
    svg.append(s('text', { x: PAD.left - 6, y: gy + 4, class: 'tick', 'text-anchor': 'end' }, format(top * f)));
  }
  svg.append(s('text', { x: PAD.left, y: H - 6, class: 'tick', 'text-anchor': 'start' }, clock(t0)));
  svg.append(s('text', { x: W - PAD.right, y: H - 6, class: 'tick', 'text-anchor': 'end' }, clock(t1)));

  series.forEach((se, i) => {
    let d = '';
    let pen = false;
    let first = null;
    let last = null;
    let gaps = false;
    for (const [t, v] of se.points) {
      if (!isNum(v)) {
        gaps = gaps || first !== null;
        pen = false;
        continue;
      }
      const px = x(t).toFixed(1);
      const py = y(v).toFixed(1);
      d += `${pen ? 'L' : 'M'}${px},${py}`;
      pen = true;
      if (!first) first = [px, py];
      last = [px, py];
    }
    if (!d) return;
    if (i === 0 && first && !gaps) {
      svg.append(s('path', {
        d: `${d}L${last[0]},${y(0)}L${first[0]},${y(0)}Z`, fill: se.color, class: 'chart-area',
      }));
    }
    svg.append(s('path', { d, stroke: se.color, class: 'chart-line' }));
    if (last) svg.append(s('circle', { cx: last[0], cy: last[1], r: 2.5, fill: se.color }));
  });
  fig.append(svg);
  return fig;
}
