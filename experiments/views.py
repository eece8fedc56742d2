from django.http import HttpResponse


def home(request):
    return HttpResponse(
        "Video–music preference studies. Participants: use the link you were given."
    )
