function(doc) { emit(doc.date, [doc.ip, doc.process]) }
