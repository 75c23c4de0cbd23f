function(doc) { emit([doc.ip], 1) }
