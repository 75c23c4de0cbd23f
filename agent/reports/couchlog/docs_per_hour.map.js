function(doc) {
  var m = doc.agent;
  if (m && typeof m.read_at === 'string') {
    emit([m.read_at.slice(0, 13), m.source], 1);
  }
}
