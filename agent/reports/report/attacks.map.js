function(doc) { var date = new Date(doc.date); emit([doc.machine, date.getFullYear(), date.getMonth(), date.getDate()], 1) }
