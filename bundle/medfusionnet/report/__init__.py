"""Reports of a run for people and for a PACS: the HTML decision report (`html`) and DICOM SR / SEG (`dicom`)."""
