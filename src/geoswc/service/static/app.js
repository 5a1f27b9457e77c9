/* geoswc map page: upload photos to POST api/locate and draw each prediction on a Leaflet map.
 * Works offline: Leaflet and the Natural Earth outlines are served from static/vendor/. */
(function () {
  'use strict';

  var TOKEN_KEY = 'geoswc.token';
  var BAND = 240; // the map shows longitudes -240..240; the base map is copied across the antimeridian
  var CLUSTER_COLORS = ['#e64980', '#12b886', '#7048e8', '#f08c00', '#1098ad', '#d6336c', '#5c940d',
    '#ae3ec9', '#e8590c', '#1971c2'];
  var NOISE_COLOR = '#868e96';
  var CELL_COLOR = '#e8590c';
  /* The offline base map is Natural Earth's 1:50m outlines, a point every ~8 km (median): from zoom 9 on, the median
   * stretch between two points is 25-35 px long and more, so zooming in shows straight lines and, inside a country,
   * nothing at all. A result's view stops at this zoom, and beyond it the map says that the detail ends there. */
  var DETAIL_ZOOM = 8;
  var THUMB_LIMIT = 24; // thumbnails shown (in the strip and on the map): the most similar neighbours' only
  var THUMB_CONCURRENCY = 4; // thumbnail requests in flight at once
  var THUMB_MIN_ZOOM = 6; // below it a 40 px thumbnail on the map would cover ~100 km: shown only in the strip

  var state = {
    config: null, items: [], selected: -1, map: null, overlay: null, basemap: null, renderer: null, retries: 0,
    thumbs: {}, thumbQueue: [], thumbActive: 0, focus: null, zoomButton: null, detailNote: null, renderMs: null,
  };
  var $ = function (id) { return document.getElementById(id); };

  // -- geometry ------------------------------------------------------------------------------------

  /** The longitude equal to `lon` modulo 360 that is nearest to `ref`. */
  function nearLon(lon, ref) {
    var d = ((lon - ref) % 360 + 540) % 360 - 180;
    return ref + d;
  }

  var THRESHOLDS = [1, 25, 200, 750, 2500]; // the keys of within_km
  var RING_MASS = [0.5, 0.9];

  /** The radius in km that holds `q` of the calibrated mass: the first threshold whose P(within) reaches q,
   * interpolated on a log scale between it and the threshold below; null when even 2500 km holds less. */
  function massRadiusKm(within, q) {
    if (!within) return null;
    for (var i = 0; i < THRESHOLDS.length; i++) {
      var pi = within[String(THRESHOLDS[i])];
      if (pi >= q) {
        if (i === 0) return THRESHOLDS[0];
        var lo = within[String(THRESHOLDS[i - 1])], f = pi > lo ? (q - lo) / (pi - lo) : 1;
        return Math.exp(Math.log(THRESHOLDS[i - 1]) + f * (Math.log(THRESHOLDS[i]) - Math.log(THRESHOLDS[i - 1])));
      }
    }
    return null;
  }

  function fmtPct(v) {
    return v >= 0.01 ? (100 * v).toFixed(0) + ' %' : '< 1 %';
  }

  /** The calibrated chances in words: "within 25 km: 2 %, within 750 km: 31 %, ...". */
  function chances(within) {
    return THRESHOLDS.slice(1).map(function (t) { return 'within ' + t + ' km: ' + fmtPct(within[String(t)]); })
      .join(', ');
  }

  /** Without a calibrator: confidence -> circle radius in km: 25 km x 100^(1 - confidence), i.e. 25 km when the
   * model is sure, 250 km at 0.5, 2500 km (a continent) at 0. Lower confidence, bigger circle, on a log scale. */
  function radiusKm(confidence) {
    var c = Math.min(1, Math.max(0, Number(confidence) || 0));
    return 25 * Math.pow(100, 1 - c);
  }

  /** Make a ring's longitudes continuous (no jump over 180 degrees between neighbours). A ring around a
   * pole (its longitudes wind by 360 degrees) is closed along that pole, so that it fills the polar cap
   * instead of drawing a band across the map. `ring` is [[lat, lon], ...]; returns a new ring. */
  function unwrapRing(ring) {
    if (!ring.length) return [];
    var out = [[ring[0][0], ring[0][1]]];
    var prev = ring[0][1];
    var latSum = ring[0][0];
    for (var i = 1; i < ring.length; i++) {
      var lon = nearLon(ring[i][1], prev);
      out.push([ring[i][0], lon]);
      latSum += ring[i][0];
      prev = lon;
    }
    var first = out[0][1];
    var winding = nearLon(first, prev) - first; // 0 for an ordinary ring, +-360 around a pole
    if (Math.abs(winding) > 180) {
      var pole = latSum / ring.length < 0 ? -90 : 90;
      out.push([out[0][0], first + winding], [pole, first + winding], [pole, first]);
    }
    return out;
  }

  function lonRange(ring) {
    var lo = Infinity, hi = -Infinity;
    for (var i = 0; i < ring.length; i++) {
      if (ring[i][1] < lo) lo = ring[i][1];
      if (ring[i][1] > hi) hi = ring[i][1];
    }
    return [lo, hi];
  }

  function shiftRing(ring, dLon) {
    return ring.map(function (p) { return [p[0], p[1] + dLon]; });
  }

  /** A polygon ([outer, holes...], unwrapped) and its copies shifted by 360 degrees, keeping those that
   * overlap longitudes [lo, hi]: a country crossing the antimeridian shows on both sides of it. */
  function polygonCopies(poly, lo, hi) {
    var r = lonRange(poly[0]);
    var out = [];
    [-360, 0, 360].forEach(function (k) {
      if (r[1] + k > lo && r[0] + k < hi) {
        out.push(poly.map(function (ring) { return shiftRing(ring, k); }));
      }
    });
    return out;
  }

  /** GeoJSON (Multi)Polygon coordinates -> unwrapped Leaflet polygons [[outer, holes...], ...], copied
   * across the antimeridian where needed. */
  function geometryPolygons(geom) {
    if (!geom) return [];
    var polys = geom.type === 'Polygon' ? [geom.coordinates] : geom.type === 'MultiPolygon' ? geom.coordinates : [];
    var out = [];
    polys.forEach(function (poly) {
      var outer = unwrapRing(poly[0].map(function (c) { return [c[1], c[0]]; }));
      var anchor = outer.length ? outer[0][1] : 0;
      var rings = [outer].concat(poly.slice(1).map(function (hole) {
        var h = hole.map(function (c) { return [c[1], c[0]]; });
        if (h.length) h[0] = [h[0][0], nearLon(h[0][1], anchor)];
        return unwrapRing(h);
      }));
      out = out.concat(polygonCopies(rings, -BAND, BAND));
    });
    return out;
  }

  /** Great-circle distance in km between [lat, lon] points (the haversine formula, mean Earth radius). */
  function distanceKm(a, b) {
    var rad = Math.PI / 180, dLat = (b[0] - a[0]) * rad, dLon = (b[1] - a[1]) * rad;
    var h = Math.pow(Math.sin(dLat / 2), 2) + Math.cos(a[0] * rad) * Math.cos(b[0] * rad) * Math.pow(Math.sin(dLon / 2), 2);
    return 2 * 6371.0088 * Math.asin(Math.min(1, Math.sqrt(h)));
  }

  /** Points along the great circle from a to b ([lat, lon] degrees), longitudes continuous from a's. */
  function greatCircle(a, b, n) {
    var rad = Math.PI / 180;
    function xyz(p) {
      var la = p[0] * rad, lo = p[1] * rad;
      return [Math.cos(la) * Math.cos(lo), Math.cos(la) * Math.sin(lo), Math.sin(la)];
    }
    var u = xyz(a), v = xyz(b);
    var dot = Math.max(-1, Math.min(1, u[0] * v[0] + u[1] * v[1] + u[2] * v[2]));
    var omega = Math.acos(dot);
    if (omega < 1e-6 || Math.PI - omega < 1e-6) return [a, [b[0], nearLon(b[1], a[1])]];
    var out = [], prev = a[1];
    for (var i = 0; i <= n; i++) {
      var t = i / n, s = Math.sin(omega);
      var f = Math.sin((1 - t) * omega) / s, g = Math.sin(t * omega) / s;
      var x = f * u[0] + g * v[0], y = f * u[1] + g * v[1], z = f * u[2] + g * v[2];
      var lon = nearLon(Math.atan2(y, x) / rad, prev);
      out.push([Math.atan2(z, Math.sqrt(x * x + y * y)) / rad, lon]);
      prev = lon;
    }
    return out;
  }

  /** Largest longitude step between consecutive vertices of the drawn base map (a stray band means ~360). */
  function basemapMaxJump() {
    var worst = 0;
    if (!state.basemap) return null;
    state.basemap.eachLayer(function (layer) {
      var stack = [layer.getLatLngs()];
      while (stack.length) {
        var a = stack.pop();
        if (a.length && a[0].lat === undefined) { a.forEach(function (x) { stack.push(x); }); continue; }
        for (var i = 0; i < a.length; i++) {
          var b = a[(i + 1) % a.length];
          // Edges along a pole (closing a ring around it) lie off the Mercator map: not a band.
          if (Math.abs(a[i].lat) > 85 && Math.abs(b.lat) > 85) continue;
          worst = Math.max(worst, Math.abs(b.lng - a[i].lng));
        }
      }
    });
    return worst;
  }

  // -- map -----------------------------------------------------------------------------------------

  function initMap(config) {
    var map = L.map('map', {
      center: [20, 0], zoom: 2, minZoom: 1, maxZoom: config.tiles ? 18 : 12, worldCopyJump: false,
      maxBounds: [[-89, -BAND], [89, BAND]], maxBoundsViscosity: 0.8, zoomSnap: 0.5,
    });
    map.attributionControl.setPrefix('<a href="https://leafletjs.com">Leaflet</a>');
    // Panes, bottom to top: the offline base map (300), the drawn prediction on one canvas (Leaflet's overlay pane,
    // 400), the thumbnails (450), the estimate marker (620), then Leaflet's tooltips (650) and popups (700). The
    // estimate is always on top of the evidence, so a click on it always opens its popup.
    map.createPane('geoswcBase').style.zIndex = 300;
    map.createPane('geoswcThumbs').style.zIndex = 450;
    map.createPane('geoswcEstimate').style.zIndex = 620;
    state.renderer = L.canvas({ padding: 0.5, tolerance: 3 });
    var baseLayers = {};
    var outlines = L.layerGroup();
    baseLayers['Natural Earth (offline)'] = outlines;
    if (config.tiles) {
      var tiles = L.tileLayer(config.tiles, { attribution: config.tiles_attribution || '', maxZoom: 18 });
      baseLayers['Tiles'] = tiles;
      tiles.addTo(map);
      L.control.layers(baseLayers, null, { collapsed: true }).addTo(map);
    } else {
      outlines.addTo(map);
    }
    state.map = map;
    state.basemap = outlines;
    state.overlay = L.featureGroup().addTo(map);
    L.control.scale({ imperial: false }).addTo(map);
    addZoomButton(map);
    addDetailNote(map);
    map.on('zoomend baselayerchange overlayadd', updateZoomDependent);
    updateZoomDependent();
    loadOutlines(outlines);
  }

  /** The "Zoom to estimate" button under the zoom buttons: back to the view of the estimate and its evidence. */
  function addZoomButton(map) {
    var Button = L.Control.extend({
      options: { position: 'topleft' },
      onAdd: function () {
        var b = L.DomUtil.create('button', 'geoswc-zoom-estimate leaflet-bar');
        b.type = 'button';
        b.textContent = 'Zoom to estimate';
        b.title = 'Zoom to the estimate and the retrieved photos that agree with it';
        b.disabled = true;
        L.DomEvent.disableClickPropagation(b);
        L.DomEvent.on(b, 'click', function () { zoomToEstimate(true); });
        state.zoomButton = b;
        return b;
      },
    });
    new Button().addTo(map);
  }

  /** A note shown when zoomed in beyond what the offline base map can show. */
  function addDetailNote(map) {
    var Note = L.Control.extend({
      options: { position: 'bottomleft' },
      onAdd: function () {
        var d = L.DomUtil.create('div', 'geoswc-detail-note');
        d.setAttribute('role', 'note');
        d.textContent = 'The offline base map has no more detail beyond this zoom (Natural Earth 1:50m outlines, a ' +
          'point every ~8 km); the markers are still placed exactly.';
        d.hidden = true;
        state.detailNote = d;
        return d;
      },
    });
    new Note().addTo(map);
  }

  /** What depends on the zoom: the note past the base map's detail, the thumbnails on the map (not at
   * continent scale, where they would sit hundreds of km from the photos they show). */
  function updateZoomDependent() {
    var map = state.map, z = map.getZoom();
    if (state.detailNote) state.detailNote.hidden = !(z > DETAIL_ZOOM && map.hasLayer(state.basemap));
    map.getContainer().classList.toggle('geoswc-far', z < THUMB_MIN_ZOOM);
  }

  /** Fit the view to the estimate and its evidence (state.focus), no closer than the base map can show. */
  function zoomToEstimate(animate) {
    if (!state.focus) return;
    state.map.fitBounds(state.focus, { padding: [48, 48], maxZoom: DETAIL_ZOOM, animate: !!animate });
  }

  function loadOutlines(group) {
    var renderer = L.canvas({ padding: 0.5, pane: 'geoswcBase' });
    fetch('static/vendor/world-atlas/countries-50m.json')
      .then(function (r) { if (!r.ok) throw new Error('HTTP ' + r.status); return r.json(); })
      .then(function (topo) {
        var fc = topojson.feature(topo, topo.objects.countries);
        fc.features.forEach(function (f) {
          var polys = geometryPolygons(f.geometry);
          if (!polys.length) return;
          L.polygon(polys, {
            renderer: renderer, color: '#a59e8c', weight: 0.6, fillColor: '#f3efe4', fillOpacity: 1,
            interactive: false, smoothFactor: 0.6,
          }).addTo(group);
        });
        state.map.attributionControl.addAttribution('Made with <a href="https://www.naturalearthdata.com/">Natural Earth</a>');
        $('map').dataset.basemap = 'ready';
      })
      .catch(function (e) {
        $('map').dataset.basemap = 'failed';
        setStatus('The base map could not be loaded: ' + e.message, true);
      });
  }

  function clusterColor(c) {
    return c < 0 ? NOISE_COLOR : CLUSTER_COLORS[c % CLUSTER_COLORS.length];
  }

  function esc(s) {
    return String(s).replace(/[&<>"']/g, function (ch) {
      return { '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' }[ch];
    });
  }

  function placeLabel(p) {
    if (!p) return '';
    return [p.name, p.admin1, p.country].filter(Boolean).join(', ');
  }

  function fmtKm(km) {
    return km < 10 ? km.toFixed(1) + ' km' : Math.round(km).toLocaleString('en') + ' km';
  }

  /** The rings holding 50 % and 90 % of the calibrated mass (without a calibrator, the confidence circle). */
  function drawRings(p, lat, lon, group) {
    if (!p.within_km) {
      L.circle([lat, lon], {
        radius: radiusKm(p.confidence) * 1000, color: '#1c7ed6', weight: 2, dashArray: '6 5', fillColor: '#1c7ed6',
        fillOpacity: 0.08, className: 'geoswc-confidence', interactive: false, renderer: state.renderer,
      }).addTo(group);
      return;
    }
    RING_MASS.slice().reverse().forEach(function (q) {
      var km = massRadiusKm(p.within_km, q);
      if (km === null) return;
      L.circle([lat, lon], {
        radius: km * 1000, color: q === 0.5 ? '#1c7ed6' : '#74a0c8', weight: 2, dashArray: q === 0.5 ? null : '6 5',
        fillColor: '#1c7ed6', fillOpacity: q === 0.5 ? 0.1 : 0.04, className: 'geoswc-ring' + Math.round(100 * q),
        renderer: state.renderer,
      }).bindTooltip(Math.round(100 * q) + ' % calibrated chance that the photo was taken within ' + fmtKm(km))
        .addTo(group);
    });
  }

  // -- the evidence: thumbnails of the retrieved gallery photos ----------------------------------------

  /** A promise of an object URL for the thumbnail of gallery row `row` (GET api/thumbnails/{row}, with the token
   * when one is set: an <img> could not send it), fetched once per row; null when it cannot be had. Requests wait
   * in a queue, THUMB_CONCURRENCY at a time. */
  function thumbnailUrl(row) {
    if (!(row in state.thumbs)) {
      state.thumbs[row] = new Promise(function (resolve) {
        state.thumbQueue.push({ row: row, resolve: resolve });
      });
      pumpThumbnails();
    }
    return state.thumbs[row];
  }

  function pumpThumbnails() {
    while (state.thumbActive < THUMB_CONCURRENCY && state.thumbQueue.length) {
      var job = state.thumbQueue.shift();
      state.thumbActive++;
      fetchThumbnail(job.row).then(job.resolve).finally(function () {
        state.thumbActive--;
        pumpThumbnails();
      });
    }
  }

  function fetchThumbnail(row) {
    var headers = {};
    if (token()) headers.Authorization = 'Bearer ' + token();
    return fetch('api/thumbnails/' + row, { headers: headers })
      .then(function (r) { if (!r.ok) throw new Error('HTTP ' + r.status); return r.blob(); })
      .then(function (b) { return URL.createObjectURL(b); })
      .catch(function () { delete state.thumbs[row]; return null; });
  }

  /** Forget the thumbnails still waiting in the queue (those of a result no longer shown). */
  function dropQueuedThumbnails() {
    state.thumbQueue.splice(0).forEach(function (job) {
      delete state.thumbs[job.row];
      job.resolve(null);
    });
  }

  /** An <img> showing the thumbnail of neighbour `n` once it has loaded (a grey box until then, or if it fails). */
  function thumbnailImg(n, cls) {
    var img = el('img', cls);
    img.alt = n.image;
    img.title = n.image;
    img.dataset.row = String(n.row);
    thumbnailUrl(n.row).then(function (url) { if (url) img.src = url; else img.classList.add('missing'); });
    return img;
  }

  /** The neighbours whose thumbnails are shown: the THUMB_LIMIT most similar (the response lists them so). */
  function shownNeighbors(p) {
    return p.neighbors.slice(0, THUMB_LIMIT);
  }

  function neighborLabel(n, p) {
    return 'similarity ' + n.similarity.toFixed(2) + ' · ' + fmtKm(distanceKm([p.lat, p.lon], [n.lat, n.lon])) +
      ' from the estimate';
  }

  /** Small image markers beside the neighbours' dots on the map (only for the shown neighbours that have a
   *  thumbnail), in a pane under the estimate marker's; photos taken at the same spot (the same 0.01° of latitude
   *  and longitude, ~1 km) are set side by side in a row instead of on top of each other. */
  function drawThumbnails(p, lon, group) {
    var atSpot = {};
    shownNeighbors(p).forEach(function (n) {
      if (!n.thumbnail) return;
      var spot = n.lat.toFixed(2) + ',' + n.lon.toFixed(2), i = atSpot[spot] || 0;
      atSpot[spot] = i + 1;
      var box = el('div');
      box.appendChild(thumbnailImg(n));
      L.marker([n.lat, nearLon(n.lon, lon)], {
        icon: L.divIcon({ html: box, className: 'geoswc-thumb-marker', iconSize: [40, 40],
                          iconAnchor: [-8 - 44 * i, 20] }),
        alt: n.image, riseOnHover: true, pane: 'geoswcThumbs',
      }).bindTooltip(esc(n.image) + '<br>' + esc(neighborLabel(n, p))).addTo(group);
    });
  }

  /** The strip of retrieved photos under the details: thumbnail, similarity and distance to the estimate. */
  function renderEvidence(p, d) {
    var shown = shownNeighbors(p);
    if (!shown.some(function (n) { return n.thumbnail; })) return;
    var box = el('section', 'evidence');
    box.appendChild(el('h3', null, 'Retrieved gallery photos (the evidence)' + (shown.length < p.neighbors.length
      ? ': the ' + shown.length + ' most similar of ' + p.neighbors.length.toLocaleString('en') +
        ' (click a dot on the map for any other)' : '')));
    var list = el('ol', 'evidence-strip');
    shown.forEach(function (n) {
      var li = el('li');
      if (n.cluster === p.cluster && n.cluster >= 0) li.classList.add('agrees');
      li.appendChild(n.thumbnail ? thumbnailImg(n, 'evidence-thumb') : el('span', 'evidence-thumb none', 'no thumbnail'));
      li.appendChild(el('span', 'sim', 'sim ' + n.similarity.toFixed(2)));
      li.appendChild(el('span', 'dist', fmtKm(distanceKm([p.lat, p.lon], [n.lat, n.lon]))));
      li.title = n.image + ': ' + neighborLabel(n, p) + (n.cluster < 0 ? ', noise' : ', cluster ' + n.cluster);
      list.appendChild(li);
    });
    box.appendChild(list);
    d.appendChild(box);
  }

  /** The neighbours' dots, one feature group on the overlay's canvas (thousands draw in milliseconds), with one
   * tooltip for all of them and, on a click, a popup with the photo's thumbnail (loaded then, on demand). */
  function drawNeighbors(p, lon, group) {
    var dots = L.featureGroup();
    p.neighbors.forEach(function (n) {
      var same = n.cluster === p.cluster && n.cluster >= 0;
      var dot = L.circleMarker([n.lat, nearLon(n.lon, lon)], {
        radius: same ? 6 : 5, color: same ? '#212529' : '#fff', weight: same ? 2 : 1,
        fillColor: clusterColor(n.cluster), fillOpacity: 0.9, className: 'geoswc-neighbor', renderer: state.renderer,
      });
      dot.neighbor = n;
      dots.addLayer(dot);
    });
    dots.bindTooltip(function (layer) {
      var n = layer.neighbor;
      return esc(n.image) + '<br>similarity ' + n.similarity.toFixed(3) + ', cluster ' +
        (n.cluster < 0 ? 'none (noise)' : n.cluster) + ', ' + esc(fmtKm(distanceKm([p.lat, p.lon], [n.lat, n.lon]))) +
        ' from the estimate' + (n.thumbnail ? '<br>(click for its thumbnail)' : '');
    });
    dots.on('click', function (e) {
      var n = e.layer.neighbor, box = el('div', 'neighbor-popup');
      if (n.thumbnail) box.appendChild(thumbnailImg(n, 'evidence-thumb'));
      box.appendChild(el('div', null, n.image));
      box.appendChild(el('div', null, neighborLabel(n, p)));
      L.popup({ offset: [0, -4] }).setLatLng(e.layer.getLatLng()).setContent(box).openOn(state.map);
    });
    group.addLayer(dots);
  }

  /** The bounds the view goes to: the estimate and the neighbours of its cluster (the evidence that agrees); with
   * no cluster (a fallback, classification, no gallery), the 50 % ring or the searched cell around the estimate,
   * not a close-up that would look more precise than the estimate is. */
  function focusBounds(p, lat, lon) {
    var b = L.latLngBounds([lat, lon], [lat, lon]);
    var agree = p.cluster >= 0 ? p.neighbors.filter(function (n) { return n.cluster === p.cluster; }) : [];
    agree.forEach(function (n) { b.extend([n.lat, nearLon(n.lon, lon)]); });
    if (agree.length) return b;
    // No evidence to go by: the 50 % ring (the confidence circle without a calibrator), else the searched cell
    // when it is not huge, else 250 km around.
    var km = p.within_km ? massRadiusKm(p.within_km, 0.5) : radiusKm(p.confidence);
    if (km !== null) return b.extend(L.latLng(lat, lon).toBounds(2 * km * 1000));
    var ring = p.cell_polygon && p.cell_polygon.length ? unwrapRing(p.cell_polygon) : [], r = lonRange(ring);
    if (ring.length && r[1] - r[0] <= 30) {
      var mid = (r[0] + r[1]) / 2;
      shiftRing(ring, nearLon(mid, lon) - mid).forEach(function (q) {
        b.extend([Math.max(-85, Math.min(85, q[0])), q[1]]);
      });
      return b;
    }
    return b.extend(L.latLng(lat, lon).toBounds(2 * 250e3));
  }

  /** Draw one prediction: top cells, probability rings, neighbours, estimate marker and the photo's GPS; then
   * go to the estimate and its evidence. */
  function drawPrediction(p) {
    var group = state.overlay;
    state.map.closePopup();
    group.clearLayers();
    var lat = p.lat, lon = nearLon(p.lon, 0);
    // The view first, so that the layers are projected once, at the zoom they are shown at.
    state.focus = focusBounds(p, lat, lon);
    if (state.zoomButton) state.zoomButton.disabled = false;
    zoomToEstimate(false);
    var pmax = Math.max.apply(null, p.top_cells.map(function (c) { return c.probability; }).concat([1e-9]));
    p.top_cells.slice().reverse().forEach(function (c) {
      var ring = unwrapRing(c.polygon);
      var r = lonRange(ring);
      var mid = (r[0] + r[1]) / 2;
      ring = shiftRing(ring, nearLon(mid, lon) - mid);
      var rank = p.top_cells.indexOf(c) + 1;
      polygonCopies([ring], lon - 180, lon + 180).forEach(function (poly) {
        L.polygon(poly, {
          color: CELL_COLOR, weight: rank === 1 ? 2 : 1, fillColor: CELL_COLOR,
          fillOpacity: 0.04 + 0.3 * c.probability / pmax, className: 'geoswc-cell', renderer: state.renderer,
        }).bindTooltip('#' + rank + ' cell ' + esc(c.token) + ': ' + (100 * c.probability).toFixed(1) + ' %', { sticky: true })
          .addTo(group);
      });
    });
    if (p.cell_polygon && p.cell_polygon.length) { // the searched cell, drawn as an outline on top
      var sring = unwrapRing(p.cell_polygon), sr = lonRange(sring), smid = (sr[0] + sr[1]) / 2;
      sring = shiftRing(sring, nearLon(smid, lon) - smid);
      polygonCopies([sring], lon - 180, lon + 180).forEach(function (poly) {
        L.polygon(poly, {
          color: '#212529', weight: 2, dashArray: '4 4', fill: false, className: 'geoswc-searched',
          renderer: state.renderer,
        }).bindTooltip('searched cell ' + esc(p.cell) + ': ' + (100 * p.cell_probability).toFixed(1) + ' %',
          { sticky: true })
          .addTo(group);
      });
    }
    drawRings(p, lat, lon, group);
    drawNeighbors(p, lon, group);
    drawThumbnails(p, lon, group);
    if (p.exif) {
      var path = greatCircle([lat, lon], [p.exif.lat, p.exif.lon], 64);
      var ex = path[path.length - 1];
      L.polyline(path, {
        color: '#2b8a3e', weight: 2, dashArray: '2 6', className: 'geoswc-exif-line', renderer: state.renderer,
      }).addTo(group);
      L.circleMarker(ex, {
        radius: 7, color: '#fff', weight: 2, fillColor: '#2b8a3e', fillOpacity: 1, className: 'geoswc-exif',
        renderer: state.renderer,
      }).bindTooltip("The photo's own GPS: " + fmtKm(p.exif.distance_km) + ' from the estimate').addTo(group);
    }
    var label = placeLabel(p.place);
    var marker = L.marker([lat, lon], {
      title: label || 'estimate', alt: 'estimate', pane: 'geoswcEstimate',
    }).bindPopup('<b>' + esc(label || 'Estimate') + '</b><br>' + lat.toFixed(4) + ', ' + p.lon.toFixed(4) +
        (p.within_km ? '<br>' + esc(chances(p.within_km)) + (p.localizable ? '' : '<br><b>not localizable</b>')
          : '<br>confidence ' + (100 * p.confidence).toFixed(0) + ' %'))
      .addTo(group);
    marker.getElement().classList.add('geoswc-estimate');
  }

  /** How many layers of the drawn prediction carry the class `cls` (they are drawn on a canvas, not as elements). */
  function drawn(cls) {
    var count = 0;
    (function walk(g) {
      g.eachLayer(function (l) {
        if (l instanceof L.LayerGroup) walk(l);
        else if (l.options && l.options.className === cls) count++;
      });
    })(state.overlay);
    return count;
  }

  // -- the list and the details ----------------------------------------------------------------------

  function setStatus(text, isError) {
    var s = $('status');
    s.textContent = text || '';
    s.className = isError ? 'error' : '';
  }

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function renderList() {
    var ul = $('results');
    ul.textContent = '';
    state.items.forEach(function (it, i) {
      var li = el('li');
      li.dataset.index = String(i);
      li.dataset.status = it.status;
      if (it.status === 'error') li.classList.add('error');
      if (i === state.selected) li.classList.add('selected');
      var img = el('img');
      img.alt = '';
      img.src = it.url;
      img.onerror = function () { img.replaceWith(el('span', 'thumb')); };
      var text = el('div', 'text');
      text.appendChild(el('div', 'name', it.name));
      var sub;
      if (it.status === 'pending') sub = 'locating…';
      else if (it.status === 'error') sub = it.error;
      else sub = (placeLabel(it.result.place) || it.result.lat.toFixed(3) + ', ' + it.result.lon.toFixed(3)) +
        ' · ' + (it.result.within_km ? (it.result.localizable ? '' : 'not localizable · ') + 'within 2500 km: ' +
          fmtPct(it.result.within_km['2500']) : (100 * it.result.confidence).toFixed(0) + ' %');
      text.appendChild(el('div', 'sub', sub));
      li.appendChild(img);
      li.appendChild(text);
      if (it.status === 'done') {
        li.tabIndex = 0;
        li.addEventListener('click', function () { select(i); });
        li.addEventListener('keydown', function (e) { if (e.key === 'Enter' || e.key === ' ') select(i); });
      }
      ul.appendChild(li);
    });
  }

  function row(dl, key, value) {
    dl.appendChild(el('dt', null, key));
    var dd = el('dd');
    if (value instanceof Node) dd.appendChild(value); else dd.textContent = value;
    dl.appendChild(dd);
  }

  function renderDetails(p) {
    var d = $('details');
    d.textContent = '';
    d.hidden = false;
    d.appendChild(el('h2', null, p.image));
    var place = el('div', 'place');
    if (p.place) {
      place.appendChild(document.createTextNode('Near '));
      place.appendChild(el('strong', 'place-name', placeLabel(p.place)));
      place.appendChild(document.createTextNode(' (' + fmtKm(p.place.distance_km) + ' away)'));
    } else {
      place.appendChild(el('span', 'place-name', 'no named place'));
    }
    d.appendChild(place);
    if (p.localizable === false) d.appendChild(el('p', 'not-localizable', notLocalizable()));
    if (p.prior_like) {
      d.appendChild(el('p', 'prior-like', 'No better than the model\'s prior: this is what the model answers for ' +
        'almost any photo (the photo moved its cell probabilities by ' + p.prior_kl.toFixed(2) + ' nats, and no ' +
        'gallery photos agree on a place).'));
    }
    var dl = el('dl');
    row(dl, 'estimate', p.lat.toFixed(5) + ', ' + p.lon.toFixed(5));
    if (p.within_km) {
      row(dl, 'chances', chances(p.within_km));
      row(dl, 'rings', RING_MASS.map(function (q) {
        var km = massRadiusKm(p.within_km, q);
        return Math.round(100 * q) + ' %: ' + (km === null ? 'beyond 2500 km (not drawn)' : 'within ' + fmtKm(km));
      }).join('; '));
    } else {
      row(dl, 'chances', 'not calibrated: this model has no calibrator (geoswc calibrate)');
      row(dl, 'confidence', (100 * p.confidence).toFixed(1) + ' % (circle ' + fmtKm(radiusKm(p.confidence)) + ')');
    }
    row(dl, 'method', p.method);
    var top = p.top_cells[0];
    if (top) row(dl, 'top cell', top.token + ' (' + (100 * top.probability).toFixed(1) + ' %)');
    row(dl, 'searched cell', p.cell + ' (' + (100 * p.cell_probability).toFixed(1) + ' %)');
    if (top && top.token !== p.cell) dl.appendChild(el('dd', 'cell-note', cellNote()));
    if (p.fallback) {
      row(dl, 'evidence', 'the cell holds no gallery photo: its centroid is the estimate');
    } else if (p.neighbors.length) {
      var agree = p.neighbors.filter(function (n) { return n.cluster === p.cluster && n.cluster >= 0; }).length;  // noise agrees with nothing
      row(dl, 'evidence', agree + ' of ' + p.neighbors.length + ' retrieved photos agree (best similarity ' +
        p.neighbors[0].similarity.toFixed(2) + ')');
    }
    var gps = el('span', 'exif');
    gps.textContent = p.exif
      ? p.exif.lat.toFixed(5) + ', ' + p.exif.lon.toFixed(5) + ': the estimate is ' + fmtKm(p.exif.distance_km) + ' off'
      : 'none in the photo';
    row(dl, 'photo GPS', gps);
    d.appendChild(dl);
    var table = el('table');
    var head = el('tr');
    ['#', 'top cell', 'probability'].forEach(function (h) { head.appendChild(el('th', null, h)); });
    table.appendChild(head);
    p.top_cells.forEach(function (c, i) {
      var tr = el('tr');
      tr.appendChild(el('td', null, String(i + 1)));
      tr.appendChild(el('td', null, c.token));
      tr.appendChild(el('td', 'num', (100 * c.probability).toFixed(1) + ' %'));
      table.appendChild(tr);
    });
    d.appendChild(table);
    renderEvidence(p, d);
  }

  /** Why the searched cell is not the top cell (geoswc's select_km rule, docs/architecture.md, step 5). */
  function cellNote() {
    var km = state.config && state.config.select_km;
    return 'The searched cell differs from the top cell because geoswc searches the cell whose neighbourhood (the ' +
      'cells whose centroids lie within ' + (km ? fmtKm(km) + ', the model\'s select_km,' : "the model's select_km") +
      ' of its centroid) holds the most probability in total, not the single most probable cell.';
  }

  function notLocalizable() {
    var r = state.config && state.config.localizable_rule;
    return 'Not localizable: ' + (r ? 'the model gives less than ' + Math.round(100 * r.p) +
      ' % chance that this estimate is within ' + r.within_km + ' km of where the photo was taken'
      : 'the model does not trust this estimate') + '. It is shown, but do not rely on it.';
  }

  function select(i) {
    var it = state.items[i];
    if (!it || it.status !== 'done') return;
    var t0 = performance.now();
    dropQueuedThumbnails();
    state.selected = i;
    renderList();
    renderDetails(it.result);
    drawPrediction(it.result);
    state.renderMs = performance.now() - t0;
  }

  // -- uploads ----------------------------------------------------------------------------------------

  function token() {
    return ($('token').value || '').trim();
  }

  function fmtMiB(bytes) {
    return (bytes / 1048576).toFixed(bytes < 10485760 ? 1 : 0) + ' MiB';
  }

  function sleep(ms) {
    return new Promise(function (resolve) { setTimeout(resolve, ms); });
  }

  function fail(items, message) {
    items.forEach(function (it) { it.status = 'error'; it.error = message; });
  }

  /** POST one batch (at most limits.max_files files); retries a few times on 503 after Retry-After. */
  async function send(batch) {
    var headers = {};
    if (token()) headers.Authorization = 'Bearer ' + token();
    for (var attempt = 0; ; attempt++) {
      var fd = new FormData();
      batch.forEach(function (it) { fd.append('files', it.file, it.file.name); });
      var resp;
      try {
        resp = await fetch('api/locate', { method: 'POST', body: fd, headers: headers });
      } catch (e) {
        fail(batch, 'network error: ' + e.message);
        return;
      }
      var body = null;
      try { body = await resp.json(); } catch (e) { body = null; }
      if (resp.status === 503 && attempt < 3) {
        var wait = Math.min(30, Number(resp.headers.get('Retry-After')) || 2);
        setStatus('The server is busy; retrying in ' + wait + ' s…');
        await sleep(wait * 1000);
        continue;
      }
      if (resp.status === 401) {
        $('auth').classList.add('required', 'missing');
        $('token').focus();
        fail(batch, 'the server needs an API token: enter it at the top right and try again');
        return;
      }
      if (resp.ok && Array.isArray(body) && body.length === batch.length) {
        body.forEach(function (r, i) {
          var it = batch[i];
          if (r.error !== undefined) {
            it.status = 'error';
            it.error = r.error + ' (' + r.status + ')';
          } else {
            it.status = 'done';
            it.result = r;
          }
        });
        return;
      }
      fail(batch, (body && body.error ? body.error : 'HTTP ' + resp.status + ' ' + resp.statusText) +
        ' (' + resp.status + ')');
      return;
    }
  }

  async function locateFiles(fileList) {
    var files = Array.prototype.slice.call(fileList);
    if (!files.length) return;
    var limits = state.config.limits;
    var fresh = files.map(function (f) {
      var it = { file: f, name: f.name, url: URL.createObjectURL(f), status: 'pending' };
      if (f.size > limits.max_upload_bytes) {
        it.status = 'error';
        it.error = 'larger than the server limit of ' + fmtMiB(limits.max_upload_bytes) + ' (413)';
      }
      return it;
    });
    var first = state.items.length;
    state.items = state.items.concat(fresh);
    renderList();
    var todo = fresh.filter(function (it) { return it.status === 'pending'; });
    setStatus('Locating ' + todo.length + ' photo' + (todo.length === 1 ? '' : 's') + '…');
    for (var i = 0; i < todo.length; i += limits.max_files) {
      await send(todo.slice(i, i + limits.max_files));
      renderList();
    }
    var done = fresh.filter(function (it) { return it.status === 'done'; }).length;
    var failed = fresh.length - done;
    setStatus(done + ' located' + (failed ? ', ' + failed + ' failed' : ''), failed > 0 && done === 0);
    for (var j = first; j < state.items.length; j++) {
      if (state.items[j].status === 'done') { select(j); break; }
    }
  }

  function initUpload() {
    var drop = $('drop'), input = $('file');
    input.addEventListener('change', function () {
      locateFiles(input.files).finally(function () { input.value = ''; });
    });
    ['dragenter', 'dragover'].forEach(function (t) {
      drop.addEventListener(t, function (e) { e.preventDefault(); drop.classList.add('over'); });
    });
    ['dragleave', 'drop'].forEach(function (t) {
      drop.addEventListener(t, function (e) { e.preventDefault(); drop.classList.remove('over'); });
    });
    drop.addEventListener('drop', function (e) {
      if (e.dataTransfer && e.dataTransfer.files.length) locateFiles(e.dataTransfer.files);
    });
    drop.addEventListener('keydown', function (e) { if (e.key === 'Enter' || e.key === ' ') input.click(); });
    // Dropping a photo elsewhere on the page must not navigate away from it.
    ['dragover', 'drop'].forEach(function (t) {
      window.addEventListener(t, function (e) { e.preventDefault(); });
    });
  }

  function initToken(config) {
    var input = $('token');
    try { input.value = localStorage.getItem(TOKEN_KEY) || ''; } catch (e) { /* storage disabled */ }
    if (config.auth_required) {
      $('auth').classList.add('required');
      input.placeholder = 'required';
      if (!input.value) $('auth').classList.add('missing');
    }
    input.addEventListener('change', function () {
      try { localStorage.setItem(TOKEN_KEY, token()); } catch (e) { /* storage disabled */ }
      $('auth').classList.toggle('missing', config.auth_required && !token());
    });
  }

  function start() {
    fetch('config.json')
      .then(function (r) { if (!r.ok) throw new Error('HTTP ' + r.status); return r.json(); })
      .then(function (config) {
        state.config = config;
        var l = config.limits;
        $('limits').textContent = 'up to ' + l.max_files + ' photos at a time, ' + fmtMiB(l.max_upload_bytes) +
          ' each; JPEG, PNG, WebP, GIF, BMP, TIFF, HEIC';
        initToken(config);
        initMap(config);
        initUpload();
        document.body.dataset.ready = 'true';
      })
      .catch(function (e) { setStatus('Cannot reach the service: ' + e.message, true); });
  }

  window.geoswc = {
    state: state, nearLon: nearLon, unwrapRing: unwrapRing, radiusKm: radiusKm, massRadiusKm: massRadiusKm,
    geometryPolygons: geometryPolygons, greatCircle: greatCircle, basemapMaxJump: basemapMaxJump, select: select,
    distanceKm: distanceKm, drawn: drawn, zoomToEstimate: zoomToEstimate, DETAIL_ZOOM: DETAIL_ZOOM,
    THUMB_LIMIT: THUMB_LIMIT, THUMB_CONCURRENCY: THUMB_CONCURRENCY, THUMB_MIN_ZOOM: THUMB_MIN_ZOOM,
  };
  start();
}());
