function(doc) {
  var m = doc.agent;
  if (m && m.parse_error && typeof m.read_at === 'string') {
    emit([m.read_at.slice(0, 10), m.source], 1);
  }
}
